"""``hf-obliviate space``: serve the Gradio Space locally (on 127.0.0.1 by default).

hf-obliviate space --port 7860
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .cli import _parse

__all__ = ["COMMANDS", "SpaceConfig", "space_main"]


@dataclass
class SpaceConfig:
    """Where to serve the Space and how many events run at once."""

    host: str = field(default="127.0.0.1", metadata={"help": "Interface to listen on (127.0.0.1: this machine only)."})
    port: int = field(default=7860, metadata={"help": "Port to listen on."})
    concurrency: int = field(default=1, metadata={"help": "Events processed at the same time (the queue holds 64)."})

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be between 1 and 65535, got {self.port}.")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {self.concurrency}.")


def space_main(config: SpaceConfig):
    """Serve the Space on the demo's artifacts (``make demo``, ``hf-obliviate freelunch``) until interrupted."""
    try:
        from .space import launch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ValueError(f"The Space needs gradio: pip install 'hf-obliviate[space]' ({err}).") from err
    return launch(host=config.host, port=config.port, concurrency=config.concurrency)


def _space(argv: Sequence[str]) -> None:
    (config,) = _parse([SpaceConfig], argv, "hf-obliviate space")
    space_main(config)


COMMANDS = {
    "space": (_space, "Serve the Gradio Space (probe triggers on defended vs undefended models) on 127.0.0.1."),
}
