"""Built-in environments, by versioned name."""
from __future__ import annotations

BUILTIN_ENVS = {
    "mailbox_v0": "producers.envs.mailbox_v0:parallel_env",
    "sandbox_v0": "producers.envs.sandbox_v0:parallel_env",
}
