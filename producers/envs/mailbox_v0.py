"""mailbox_v0: three agents triage a stream of mail items that carry personal data (seed 000).

Each step one mail item arrives. Its identifiers (recipient user id, item id, sender address) are
personal data: they stay inside the process and reach events only through
``subject_fields()`` (pseudonym + AES-GCM ciphertext, see eventlog/privacy.py). Whether an item is
malicious is hidden from the agents (not in any observation or in ``state()``); only the privileged
``state_flags()`` (written into env.state's ``flags`` by the harness, for centralized critics and the
decision interpreter, never into an agent's observation) carries it, as ``label:malicious``.

| | |
|---|---|
| Agents | ``get``, ``open``, ``bin`` (all act every step) |
| ``get`` action | Discrete(3): 0 SKIP, 1 GET (deliver to the user), 2 DEFER |
| ``open`` action | Discrete(5): 0 NOOP, 1 OPEN (plain; a security breach on a malicious item), 2 OPEN_SAFE_PREVIEW, 3 OPEN_SANDBOX, 4 QUARANTINE |
| ``bin`` action | Discrete(2): 0 KEEP, 1 BIN |
| ``get`` observation | Box(0, 1, (4,)): sender_reputation, urgency, link_count/10, inbox fraction left |
| ``open`` observation | Box(0, 1, (6,)): attachment one-hot (none, document, archive, executable), link_count/10, sender_reputation |
| ``bin`` observation | Box(0, 1, (4,)): sender_reputation, attachment is executable, link_count/10, urgency |
| State | Box(0, 1, (9,)): sender_reputation, attachment one-hot (4), link_count/10, urgency, inbox fraction left, step fraction |
| Collapsed state | 4 floats: sender_reputation, attachment risk (0, .3, .6, 1), link_count/10, urgency |
| Rewards (raw, per agent) | see ``REWARDS``: e.g. OPEN on a malicious item -10 (breach), BIN on a benign item -1 |
| Infos | ``conflict`` (GET and BIN on the same item), ``breach`` (plain OPEN on a malicious item) |
| Episode | ``inbox_size`` items; all agents terminate after the last |
| Arguments | ``inbox_size=20``, ``n_users=5``, ``n_senders=8``, ``malicious_rate=0.3`` |
"""
from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from eventlog.privacy import ProtectedValue

ENV_ID = "mailbox_v0"
ENV_VERSION = "0"

AGENTS = ("get", "open", "bin")
SKIP, GET, DEFER = 0, 1, 2
NOOP, OPEN, OPEN_SAFE_PREVIEW, OPEN_SANDBOX, QUARANTINE = 0, 1, 2, 3, 4
KEEP, BIN = 0, 1
ATTACHMENTS = ("none", "document", "archive", "executable")
ATTACHMENT_RISK = (0.0, 0.3, 0.6, 1.0)

# (benign, malicious) reward of each action, per agent
REWARDS = {
    "get": {SKIP: (-0.5, 0.5), GET: (1.0, -1.0), DEFER: (0.0, 0.0)},
    "open": {NOOP: (0.0, 0.0), OPEN: (1.0, -10.0), OPEN_SAFE_PREVIEW: (0.8, 0.2), OPEN_SANDBOX: (0.5, 0.8),
             QUARANTINE: (-0.5, 1.0)},
    "bin": {KEEP: (0.2, -0.5), BIN: (-1.0, 1.0)},
}
_DOMAINS = ("corp-mail.example", "partner.example", "freemail.example", "invoices.example")


class MailboxEnv(ParallelEnv):
    metadata = {"name": ENV_ID, "render_modes": [], "is_parallelizable": True}

    def __init__(self, inbox_size: int = 20, n_users: int = 5, n_senders: int = 8, malicious_rate: float = 0.3):
        if inbox_size < 1 or n_users < 1 or n_senders < 1 or not 0.0 <= malicious_rate <= 1.0:
            raise ValueError(f"mailbox_v0 needs inbox_size, n_users, n_senders >= 1 and 0 <= malicious_rate <= 1; "
                             f"got {inbox_size}, {n_users}, {n_senders}, {malicious_rate}")
        self.inbox_size, self.n_users, self.n_senders = inbox_size, n_users, n_senders
        self.malicious_rate = malicious_rate
        self.possible_agents = list(AGENTS)
        self.agents: list[str] = []
        self._obs_spaces = {"get": spaces.Box(0.0, 1.0, (4,), np.float32),
                            "open": spaces.Box(0.0, 1.0, (6,), np.float32),
                            "bin": spaces.Box(0.0, 1.0, (4,), np.float32)}
        self._act_spaces = {"get": spaces.Discrete(3), "open": spaces.Discrete(5), "bin": spaces.Discrete(2)}
        self.state_space = spaces.Box(0.0, 1.0, (9,), np.float32)
        self._rng = np.random.default_rng()
        self._t = 0

    def observation_space(self, agent: str) -> spaces.Box:
        return self._obs_spaces[agent]

    def action_space(self, agent: str) -> spaces.Discrete:
        return self._act_spaces[agent]

    # --- the inbox -------------------------------------------------------------------------------
    def _new_inbox(self) -> None:
        rng = self._rng
        self._users = [f"usr-{rng.integers(16**8):08x}" for _ in range(self.n_users)]
        self._senders = [f"s{rng.integers(10**6):06d}.{rng.integers(16**4):04x}@{_DOMAINS[rng.integers(len(_DOMAINS))]}"
                         for _ in range(self.n_senders)]
        reputation = rng.uniform(0.0, 1.0, self.n_senders)
        n = self.inbox_size
        sender = rng.integers(self.n_senders, size=n)
        self._items = {
            "user": rng.integers(self.n_users, size=n),
            "item_id": [f"msg-{rng.integers(16**12):012x}" for _ in range(n)],
            "sender": sender,
            "reputation": reputation[sender],
            "attachment": rng.choice(4, size=n, p=[0.4, 0.3, 0.2, 0.1]),
            "links": rng.integers(0, 11, size=n),
            "urgency": rng.uniform(0.0, 1.0, size=n),
        }
        # risk in [0, 1] (mean about 0.43); scaled so that about malicious_rate of items are malicious
        risk = (1.0 - self._items["reputation"]) * 0.5 + np.take(ATTACHMENT_RISK, self._items["attachment"]) * 0.3 \
            + self._items["links"] / 10.0 * 0.2
        p = risk * (self.malicious_rate / 0.43)
        self._malicious = rng.uniform(0.0, 1.0, size=n) < np.clip(p, 0.0, 1.0)

    def _features(self) -> tuple[float, np.ndarray, float, float]:
        i, it = self._t, self._items
        onehot = np.zeros(4, np.float32)
        onehot[it["attachment"][i]] = 1.0
        return float(it["reputation"][i]), onehot, float(it["links"][i]) / 10.0, float(it["urgency"][i])

    def _observations(self) -> dict[str, np.ndarray]:
        rep, onehot, links, urg = self._features()
        left = (self.inbox_size - self._t) / self.inbox_size
        return {
            "get": np.array([rep, urg, links, left], np.float32),
            "open": np.array([*onehot, links, rep], np.float32),
            "bin": np.array([rep, onehot[3], links, urg], np.float32),
        }

    # --- ParallelEnv ------------------------------------------------------------------------------
    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._new_inbox()
        self._t = 0
        self.agents = list(self.possible_agents)
        return self._observations(), {a: {} for a in self.agents}

    def step(self, actions: dict[str, Any]):
        if not self.agents:
            raise RuntimeError("mailbox_v0: step() after the episode ended; call reset() first")
        mal = int(bool(self._malicious[self._t]))
        act = {a: int(actions.get(a, 0)) for a in self.agents}
        rewards = {a: float(REWARDS[a][act[a]][mal]) for a in self.agents}
        conflict = act["get"] == GET and act["bin"] == BIN
        breach = act["open"] == OPEN and bool(mal)
        self._t += 1
        done = self._t >= self.inbox_size
        infos = {a: {"conflict": conflict, "breach": breach} for a in self.agents}
        terms = {a: done for a in self.agents}
        truncs = {a: False for a in self.agents}
        if done:
            self._t -= 1  # keep the last item observable for the final observation
            obs = self._observations()
            self.agents = []
        else:
            obs = self._observations()
        return obs, rewards, terms, truncs, infos

    def state(self) -> np.ndarray:
        rep, onehot, links, urg = self._features()
        return np.array([rep, *onehot, links, urg, (self.inbox_size - self._t) / self.inbox_size,
                         self._t / self.inbox_size], np.float32)

    def state_flags(self) -> list[str]:
        """Privileged ground truth of the current item for env.state's ``flags`` (never observed by an
        agent): ``["label:malicious"]`` for a malicious item, else ``[]``."""
        return ["label:malicious"] if bool(self._malicious[self._t]) else []

    def collapsed_state(self) -> np.ndarray:
        rep, onehot, links, urg = self._features()
        return np.array([rep, ATTACHMENT_RISK[int(onehot.argmax())], links, urg], np.float32)

    # --- personal data, for the harness's FieldProtector only --------------------------------------
    def subject_fields(self, agent: str | None) -> list[ProtectedValue]:
        """The current item's personal data seen by ``agent`` (None: the global state's)."""
        i, it = self._t, self._items
        user = self._users[it["user"][i]]
        sender = self._senders[it["sender"][i]]
        item = it["item_id"][i]
        item_id = ProtectedValue("user", "item_id", user, item.encode())
        if agent == "open":
            return [item_id]
        if agent == "bin":
            return [ProtectedValue("sender", "sender_address", sender, sender.encode()), item_id]
        user_id = ProtectedValue("user", "user_id", user, user.encode())
        if agent == "get":
            return [user_id, item_id]
        if agent is None:
            return [user_id, item_id, ProtectedValue("sender", "sender_address", sender, sender.encode())]
        raise KeyError(agent)

    def raw_identifiers(self) -> set[str]:
        """Every raw identifier of the current episode (for leak scans in tests)."""
        return set(self._users) | set(self._senders) | set(self._items["item_id"])

    def heuristic_action(self, agent: str, observation: np.ndarray) -> int:
        o = observation
        if agent == "get":
            return GET if o[0] >= 0.5 else SKIP
        if agent == "open":
            attachment, rep = int(np.argmax(o[:4])), o[5]
            if rep < 0.25:
                return QUARANTINE
            if attachment >= 2:
                return OPEN_SANDBOX
            return OPEN_SAFE_PREVIEW
        return BIN if o[0] < 0.3 and (o[1] > 0.5 or o[2] >= 0.5) else KEEP

    def render(self) -> None:
        return None

    def close(self) -> None:
        return None


def parallel_env(**kwargs) -> MailboxEnv:
    return MailboxEnv(**kwargs)


env = parallel_env
