"""Seeds 001 and 003's result tables on market_v0, retail_v0 and banking_v0, through the audited pipeline.

For each env and training seed this script runs one on-policy training (``marlgrc train-online``:
every step written as sealed, signed events, read back verified, then learned from), checks the run
with ``marlgrc verify --run RUN --require-signed``, loads the signed checkpoint, and evaluates on the
same evaluation seeds (10000, 10001, ...), without writing events, the policies:

- ``random``            uniform random actions (``producers.policies.RandomPolicy``, seeded per training seed)
- ``heuristic``         the env's own rule (``heuristic_action``)
- ``untrained``         the learner as built before its first update (same algorithm, config and seed:
                        seed 003's "before training"), sampling
- ``learned_sampled``   the trained learner, sampling (the training policy)
- ``learned_greedy``    the trained learner's deterministic policy (argmax / Gaussian mean; what ONNX exports)

and records each env's domain metrics (``env.metrics()`` at the end of every episode, averaged over
the evaluation episodes) plus the team return. Then it writes one JSON per run and a summary
(mean, sample standard deviation, min and max over the training seeds) under ``results/seed_envs/``.

market_v0 trains twice per seed: with the fairness reward (default) and with the profit-only reward
(``fair_reward=False``). ``marlgrc train-online`` has no ``--env-arg`` option (``marlgrc run --algo``
has, but no ``--minutes`` or ``--out``), so those runs go through this script's ``train`` subcommand,
which calls ``marlgrc.training.run_training`` (the very function ``train-online`` calls) with
``env_args``; the commands are written into the JSON exactly as run.

Usage (the invocation docs/results.md reports):

    ./dev python tools/seed_results.py --bootstrap 127.0.0.1:49901 --minutes 1.5 --seeds 1 2 3
    ./dev python tools/seed_results.py --summarize-only      # rebuild summary.json from the run files
    ./dev python tools/seed_results.py actions --tags market_fair market_profit   # which actions the greedy policies take
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "results" / "seed_envs"
EVAL_SEED = 10_000

# (tag, env, env_args, algorithm); env_args are passed through this script's `train` subcommand
EXPERIMENTS: list[tuple[str, str, dict, str]] = [
    ("market_fair", "market_v0", {}, "mappo"),
    ("market_profit", "market_v0", {"fair_reward": False}, "mappo"),
    ("retail", "retail_v0", {}, "mappo"),
    ("banking", "banking_v0", {}, "mappo"),
]
# the domain metrics each env's table reports (all of metrics() is kept in the JSON)
TABLE_METRICS = {
    "market_v0": ["wallet_gini", "initial_wallet_gini", "total_profit", "agents_profit", "success_rate",
                  "jobs_unassigned"],
    "retail_v0": ["total_cost", "stockout_rate", "stockout_cost", "holding_cost", "transfer_cost", "fill_rate"],
    "banking_v0": ["avg_latency_ms", "risk_violation_rate", "risk_violations", "total_cost", "avg_cost",
                   "latency_violation_rate"],
}


# --- training --------------------------------------------------------------------------------------
def train_command(env: str, env_args: dict, algo: str, seed: int, minutes: float, curve: Path, ckpt: Path,
                  bootstrap: str, home: Path, prefix: str, sets: list[str]) -> list[str]:
    """The command that trains one run: ``./dev train-online`` when the env takes no arguments, else
    this script's ``train`` subcommand (run_training with env_args; train-online has no --env-arg)."""
    common = ["--env", env, "--algo", algo, "--minutes", str(minutes), "--seed", str(seed), "--out", str(curve),
              "--checkpoint", str(ckpt), "--eval-episodes", "0", "--bootstrap", bootstrap, "--home", str(home),
              "--prefix", prefix]
    for s in sets:
        common += ["--set", s]
    if not env_args:
        return ["./dev", "train-online", *common]
    extra = []
    for k, v in env_args.items():
        extra += ["--env-arg", f"{k}={json.dumps(v)}"]
    return ["./dev", "python", "tools/seed_results.py", "train", *common, *extra]


def train_subcommand(argv: list[str]) -> None:
    """``train``: ``marlgrc.training.run_training`` with env_args (what train-online would run if it took
    --env-arg). Same options as train-online, plus repeatable ``--env-arg NAME=JSON``."""
    p = argparse.ArgumentParser(prog="seed_results.py train")
    p.add_argument("--env", required=True)
    p.add_argument("--algo", default="mappo")
    p.add_argument("--minutes", type=float)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path)
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--eval-episodes", type=int, default=0)
    p.add_argument("--bootstrap")
    p.add_argument("--home", type=Path)
    p.add_argument("--prefix")
    p.add_argument("--set", action="append", default=[], dest="sets")
    p.add_argument("--env-arg", action="append", default=[], dest="env_args")
    a = p.parse_args(argv)
    from marlgrc.commands_producers import parse_env_args
    from marlgrc.config import Settings
    from marlgrc.training import run_training

    s = Settings.load(home=a.home, bootstrap=a.bootstrap, prefix=a.prefix)
    res = run_training(s, env=a.env, algo=a.algo, seed=a.seed, minutes=a.minutes, env_args=parse_env_args(a.env_args),
                       overrides=a.sets, out=a.out, checkpoint=a.checkpoint, eval_episodes=a.eval_episodes)
    print(res.run_id)


# --- evaluation ------------------------------------------------------------------------------------
def episode_metrics(env: Any, policy: Any, episodes: int) -> dict:
    """Mean of ``env.metrics()`` (numbers only) at the end of each episode, and the mean team return."""
    sums: dict[str, float] = {}
    ret = 0.0
    for ep in range(episodes):
        obs, _ = env.reset(seed=EVAL_SEED + ep)
        while env.agents:
            acts = policy.act({a: obs[a] for a in env.agents if a in obs})
            obs, rew, _, _, _ = env.step({a: x[0] for a, x in acts.items()})
            ret += sum(rew.values())
        for k, v in env.metrics().items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                sums[k] = sums.get(k, 0.0) + float(v)
    out = {k: v / episodes for k, v in sums.items()}
    out["team_return"] = ret / episodes
    return out


def evaluate_run(env_name: str, env_args: dict, algo: str, seed: int, ckpt: Path, home: Path, sets: list[str],
                 episodes: int) -> dict:
    """Every policy of the table on the evaluation seeds; env_args are the eval env's too (market's
    reward switch changes the rewards only, not the market's dynamics or its metrics)."""
    import torch

    from eventlog.checkpoint import Signer
    from learners import algorithm, config_overrides
    from learners.checkpoint import learner_from_checkpoint
    from learners.evaluate import GreedyPolicy
    from producers.envs import make_env
    from producers.policies import HeuristicPolicy, RandomPolicy

    torch.set_num_threads(1)
    public_key = Signer.load_or_create(home / "keys" / "signing.pem").public_key
    learner = learner_from_checkpoint(ckpt, public_key)  # refuses a checkpoint whose signature fails
    a = algorithm(algo)
    untrained = a.learner_cls(learner.spec, a.config_cls(seed=seed, **config_overrides(a.config_cls, list(sets))))
    env, _, _ = make_env(env_name, **env_args)
    policies = {"random": RandomPolicy(env, seed=seed), "heuristic": HeuristicPolicy(env), "untrained": untrained,
                "learned_sampled": learner, "learned_greedy": GreedyPolicy(learner)}
    return {"learner_version": learner.version, "optimizer_steps": learner.optimizer_steps,
            "policies": {name: episode_metrics(env, p, episodes) for name, p in policies.items()}}


# --- summary ---------------------------------------------------------------------------------------
def summarize(out_dir: Path) -> dict:
    runs = [json.loads(p.read_text()) for p in sorted(out_dir.glob("run_*.json"))]
    summary: dict[str, Any] = {"spread": "sample standard deviation over training seeds (n-1), plus min and max",
                               "experiments": {}}
    for tag, env, env_args, algo in EXPERIMENTS:
        mine = [r for r in runs if r["tag"] == tag and "eval" in r]
        if not mine:
            continue
        table: dict[str, dict] = {}
        for pol in mine[0]["eval"]["policies"]:
            table[pol] = {}
            for k in mine[0]["eval"]["policies"][pol]:
                xs = [r["eval"]["policies"][pol][k] for r in mine]
                table[pol][k] = {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                                 "min": min(xs), "max": max(xs), "values": xs}
        summary["experiments"][tag] = {
            "env": env, "env_args": env_args, "algo": algo, "seeds": [r["seed"] for r in mine],
            "train_minutes": mine[0]["minutes"], "env_steps": [r["env_steps"] for r in mine],
            "updates": [r["updates"] for r in mine], "verified": [r.get("verify", {}).get("ok") for r in mine],
            "eval_episodes": mine[0]["eval_episodes"], "table_metrics": TABLE_METRICS[env], "policies": table}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def print_tables(summary: dict) -> None:
    for tag, ex in summary["experiments"].items():
        print(f"\n## {tag} ({ex['env']} {ex['env_args']}, {ex['algo']}, seeds {ex['seeds']}, "
              f"{ex['train_minutes']} min each, env steps {ex['env_steps']}, verified {ex['verified']})")
        cols = ["team_return", *ex["table_metrics"]]
        print("| policy | " + " | ".join(cols) + " |")
        for pol, row in ex["policies"].items():
            print(f"| {pol} | " + " | ".join(f"{row[c]['mean']:.4g} ± {row[c]['std']:.2g}" for c in cols) + " |")


# --- driver ----------------------------------------------------------------------------------------
def verify_run(run_id: str, bootstrap: str, home: Path, prefix: str) -> dict:
    cmd = ["./dev", "verify", "--run", run_id, "--require-signed", "--json", "--bootstrap", bootstrap,
           "--home", str(home), "--prefix", prefix]
    t = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    out: dict[str, Any] = {"command": " ".join(cmd), "rc": p.returncode, "ok": p.returncode == 0,
                           "seconds": round(time.time() - t, 1)}
    try:
        rep = json.loads(p.stdout)
        out["report"] = {k: v for k, v in rep.items() if not isinstance(v, (list, dict))} if isinstance(rep, dict) else None
    except ValueError:
        out["stdout_tail"] = p.stdout[-2000:]
    out["stderr_tail"] = p.stderr[-1000:]
    return out


def actions_subcommand(argv: list[str]) -> None:
    """``actions``: the share of each action the greedy learned policies (and the heuristic) take on
    the evaluation seeds, per checkpoint of ``--tags`` (market_v0: which bid rung they ask). Writes
    ``OUT_DIR/actions.json``."""
    p = argparse.ArgumentParser(prog="seed_results.py actions")
    p.add_argument("--home", type=Path, default=Path("/tmp/seed_results_home"))
    p.add_argument("--tags", nargs="+", default=["market_fair", "market_profit"])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--episodes", type=int, default=30)
    a = p.parse_args(argv)
    import collections

    import torch

    from eventlog.checkpoint import Signer
    from learners.checkpoint import learner_from_checkpoint
    from learners.evaluate import GreedyPolicy
    from producers.envs import make_env
    from producers.policies import HeuristicPolicy

    torch.set_num_threads(1)
    key = Signer.load_or_create(a.home / "keys" / "signing.pem").public_key
    envs = {tag: (env, args) for tag, env, args, _ in EXPERIMENTS}

    def shares(env: Any, policy: Any) -> dict:
        count: collections.Counter = collections.Counter()
        for ep in range(a.episodes):
            obs, _ = env.reset(seed=EVAL_SEED + ep)
            while env.agents:
                acts = policy.act({ag: obs[ag] for ag in env.agents})
                count.update(int(x[0]) for x in acts.values())
                obs, _, _, _, _ = env.step({ag: x[0] for ag, x in acts.items()})
        total = sum(count.values())
        return {str(k): round(count[k] / total, 4) for k in sorted(count)}

    out: dict[str, Any] = {"episodes": a.episodes, "eval_seed": EVAL_SEED}
    for tag in a.tags:
        env, _, _ = make_env(envs[tag][0], **envs[tag][1])
        out.setdefault("heuristic", {})[envs[tag][0]] = shares(env, HeuristicPolicy(env))
        for s in a.seeds:
            learner = learner_from_checkpoint(a.home / "checkpoints" / f"{tag}_s{s}" / "policy", key)
            out[f"{tag}_s{s}_greedy"] = shares(env, GreedyPolicy(learner))
    (OUT_DIR / "actions.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "train":
        return train_subcommand(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "actions":
        return actions_subcommand(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap", default="127.0.0.1:49901", help="Kafka broker, or `memory`")
    p.add_argument("--minutes", type=float, default=1.5, help="training wall time per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--eval-episodes", type=int, default=100)
    p.add_argument("--only", nargs="+", default=[t for t, *_ in EXPERIMENTS], help="experiment tags to run")
    p.add_argument("--set", action="append", default=[], dest="sets", help="learner config override (all runs)")
    p.add_argument("--home", type=Path, default=Path("/tmp/seed_results_home"), help="scratch marlgrc home")
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    p.add_argument("--summarize-only", action="store_true")
    a = p.parse_args()
    a.out_dir.mkdir(parents=True, exist_ok=True)
    if not a.summarize_only:
        for tag, env, env_args, algo in EXPERIMENTS:
            if tag not in a.only:
                continue
            for seed in a.seeds:
                stamp = time.strftime("%Y%m%d%H%M%S")
                prefix = f"seedres-{tag}-s{seed}-{stamp}"
                curve = a.out_dir / f"curve_{tag}_s{seed}.json"
                ckpt = a.home / "checkpoints" / f"{tag}_s{seed}" / "policy"
                cmd = train_command(env, env_args, algo, seed, a.minutes, curve, ckpt, a.bootstrap, a.home, prefix,
                                    a.sets)
                print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd)}", flush=True)
                t0 = time.time()
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                      env={**os.environ, "PYTHONHASHSEED": "0"})
                wall = time.time() - t0
                rec: dict[str, Any] = {"tag": tag, "env": env, "env_args": env_args, "algo": algo, "seed": seed,
                                       "minutes": a.minutes, "transport": "memory" if a.bootstrap == "memory"
                                       else f"kafka {a.bootstrap}", "prefix": prefix, "command": " ".join(cmd),
                                       "rc": proc.returncode, "wall_s": round(wall, 1),
                                       "eval_episodes": a.eval_episodes, "sets": a.sets}
                if proc.returncode != 0:
                    rec["stderr_tail"] = proc.stderr[-3000:]
                    print(f"  FAILED rc {proc.returncode}: {proc.stderr[-1500:]}", flush=True)
                else:
                    run_id = proc.stdout.strip().splitlines()[-1]
                    c = json.loads(curve.read_text())
                    rows = c["curve"]
                    rec |= {"run_id": run_id, "updates": len(rows), "env_steps": rows[-1]["env_steps"] if rows else 0,
                            "last10_train_return": statistics.fmean(r["charts/episodic_return"] for r in rows[-10:])
                            if rows else None}
                    if a.bootstrap != "memory":
                        rec["verify"] = verify_run(run_id, a.bootstrap, a.home, prefix)
                        print(f"  verify ok={rec['verify']['ok']} ({rec['verify']['seconds']} s)", flush=True)
                    t1 = time.time()
                    rec["eval"] = evaluate_run(env, env_args, algo, seed, ckpt, a.home, a.sets, a.eval_episodes)
                    rec["eval_s"] = round(time.time() - t1, 1)
                    g = rec["eval"]["policies"]
                    print(f"  {run_id}: {rec['updates']} updates, {rec['env_steps']} env steps in {wall:.0f} s; "
                          + "; ".join(f"{n} " + ", ".join(f"{k} {g[n][k]:.3g}" for k in TABLE_METRICS[env][:3])
                                      for n in g), flush=True)
                (a.out_dir / f"run_{tag}_s{seed}.json").write_text(json.dumps(rec, indent=1))
    print_tables(summarize(a.out_dir))


if __name__ == "__main__":
    main()
