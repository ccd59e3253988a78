"""What an embedding group holds, and who may read it (no torch import).

An embedding group records its ``output`` (docs/FORMAT.md):

``joint``
    a vision-language model's image embedding in its joint image-text space, L2-normalised:
    what zero-shot scoring and text search compare with text embeddings;
``pre-projection``
    CONCH's image features before the projection into the joint space (the attentional
    pooler's output after its LayerNorm), not normalised: what CONCH's README and TRIDENT use
    for linear probes and multiple-instance learning (registry entry ``conch-features``);
``image``
    a vision-only model's pooled image features, L2-normalised.

Everything that reads a group can say which of these it read (:func:`embeddings_line`), and
anything that compares it with text refuses what is not in the joint space
(:func:`text_refusal`) before a model is loaded.
"""

from __future__ import annotations

from slide_clip.errors import ConfigError

JOINT = "joint"
PRE_PROJECTION = "pre-projection"
IMAGE = "image"

#: How each output is named in console lines.
DESCRIPTIONS = {
    JOINT: "joint image-text space",
    PRE_PROJECTION: "pre-projection features, not normalised",
    IMAGE: "image features of a vision-only model",
}

#: ``output`` values a registry entry may ask for (vision-only models always give ``image``).
ENTRY_OUTPUTS = (JOINT, PRE_PROJECTION)


def spec_output(spec) -> str:
    """The output a model spec embeds tiles into."""
    if spec.vision_only:
        return IMAGE
    return PRE_PROJECTION if spec.output == PRE_PROJECTION else JOINT


def output_of(attrs: dict) -> str:
    """The output a stored embedding group holds (groups written before it was recorded:
    ``image`` for vision-only models, else ``joint``)."""
    recorded = attrs.get("output")
    if recorded in DESCRIPTIONS:
        return str(recorded)
    return IMAGE if attrs.get("vision_only") else JOINT


def is_normalised(attrs: dict) -> bool:
    """Whether the group's rows are L2-normalised (every output but ``pre-projection``)."""
    return output_of(attrs) != PRE_PROJECTION


def embeddings_line(name: str, attrs: dict) -> str:
    """One console line naming the group a command reads, e.g.
    ``embeddings: conch (joint image-text space)``."""
    return f"embeddings: {name} ({DESCRIPTIONS[output_of(attrs)]})"


def text_refusal(name: str, attrs: dict) -> ConfigError | None:
    """Why text (zero-shot scoring, text search) cannot be compared with this group, or None."""
    out = output_of(attrs)
    if out == JOINT:
        return None
    if out == IMAGE:
        return ConfigError(
            f"model {name!r} is vision-only (no text encoder): zero-shot scoring and text search need a "
            "vision-language model",
            hint="Use a CLIP-style model (conch, plip, quiltnet-b-32, ...), or few-shot, clusters and image search.")
    return ConfigError(
        f"model {name!r} holds pre-projection image features, not the joint image-text space: zero-shot "
        "scoring and text search compare tiles with text only in the joint space",
        hint="Use the joint-space embeddings of the same model (e.g. --model conch) for prompts and text "
             "search; the pre-projection features are for survival, bags, clusters and maps.")
