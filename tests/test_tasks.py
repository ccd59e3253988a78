"""Task-layer policy without a server: which failures retry, how encoder limits are named."""

import pytest

from slide_clip.errors import ConfigError


def test_retry_policy_is_for_transient_failures_only():
    from prefect.states import Failed

    from slide_clip.errors import SlideError
    from slide_clip_tasks._policy import transient

    assert transient(None, None, Failed(data=OSError("disk went away"))) is True
    assert transient(None, None, Failed(data=SlideError("bad", path="x.svs"))) is False


def test_encoder_limit_names(monkeypatch):
    import socket

    from slide_clip_tasks.limits import limit_name

    host = socket.gethostname()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert limit_name("slide-clip-encoder-{host}") == f"slide-clip-encoder-{host}"
    assert limit_name("enc-{host}-gpu{gpu}") == f"enc-{host}-gpuall"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert limit_name("enc-{host}-gpu{gpu}") == f"enc-{host}-gpu1"
    with pytest.raises(ConfigError, match="only use the fields"):
        limit_name("enc-{machine}")
