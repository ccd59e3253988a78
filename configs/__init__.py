"""slide-clip's shipped configuration, installed as package data (``slide_clip_configs``).

Pipeline defaults (``default.yaml``), the model registry (``models.yaml``) and prompt sets
(``prompts/*.yaml``). Read them through :func:`slide_clip.resources.config_file`; a user's
own files, passed by path, always take precedence.
"""
