"""Seed 004's evidence (issue 16): MAPPO with a curriculum on trading_v0, supply_chain_v0 and
resource_allocation_v0, through Kafka, every event sealed and signed.

For each env and training seed this script

1. trains with ``marlgrc train-online --curriculum`` (printed before it runs): the env's stages from the
   easiest, promoted and regressed by its ``CURRICULUM`` over a window of episodes
   (``learners.curriculum``); every step is written as sealed, signed events to the broker under a
   topic prefix of the run's own, read back verified, then learned from;
2. checks the run with ``marlgrc verify --run RUN --require-signed`` (``tools.seed_results.verify_run``)
   and reads the run's ``curriculum.stage`` events back from Kafka (the stage changes as an auditor
   sees them, next to the learning curve's);
3. evaluates, without writing events, on the same evaluation seeds (10000, 10001, ...) at **each stage
   the run reached** (its hardest included, where the issue asks for the comparison): ``random``
   (seeded with the training seed), the env's ``heuristic``, ``learned_sampled`` (the training
   policy) and ``learned_greedy`` (argmax / Gaussian mean: what ONNX exports), loaded from the signed
   checkpoint; each figure is the mean over the episodes of ``env.metrics()`` at the episode's end
   (``tools.seed_results.episode_metrics``);
4. writes ``results/seed004/run_TAG_sS.json`` (commands, run id, prefix, verify, stage timeline,
   evaluation), keeps the learning curve as ``curve_TAG_sS.json``, and at the end
   ``summary.json`` (mean, sample standard deviation, min, max over the seeds, per stage) and one
   figure per env, ``docs/img/seed004_ENV.png`` (return per update, the 3 seeds overlaid, stage
   changes marked; the stage per update below).

Where an env's default continuous actions do not learn enough at this budget, its experiment uses the
env's discrete variant (``--env-arg continuous_actions=false``); ``EXPERIMENTS`` says which, and for
each of them one more run with the default continuous actions (first seed, same budget, through Kafka,
verified, evaluated at the stages it reached: ``probe_TAG_continuous_sS.json``) shows why
(``--no-probe`` skips it). No env argument changes difficulty or reward.

Usage (the invocation docs/results.md reports):

    ./dev python tools/seed004_results.py --bootstrap 127.0.0.1:49901 --minutes 2 --seeds 1 2 3
    ./dev python tools/seed004_results.py --summarize-only    # summary, tables and figures from the run files
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
if str(ROOT) not in sys.path:  # `./dev python tools/...` puts the root on PYTHONPATH; plain python does not
    sys.path.insert(0, str(ROOT))

from tools.seed_results import EVAL_SEED, episode_metrics, verify_run  # noqa: E402

OUT_DIR = ROOT / "results" / "seed004"
IMG_DIR = ROOT / "docs" / "img"
HOME = Path("/tmp/seed004_home")
STAGE_TOPIC = "marl.policy.update"  # curriculum.stage events: {run}:curriculum on the policy topic

# (tag, env, env_args); env_args go to train-online as --env-arg NAME=JSON and to the evaluation env
EXPERIMENTS: list[tuple[str, str, dict]] = [
    ("trading", "trading_v0", {}),
    ("supply_chain", "supply_chain_v0", {"continuous_actions": False}),
    ("resource_allocation", "resource_allocation_v0", {"continuous_actions": False}),
]
# the env's CURRICULUM metric first (the main metric), then the metrics for the env
TABLE_METRICS = {
    "trading_v0": ["sharpe", "return", "max_drawdown", "turnover", "excess_return"],
    "supply_chain_v0": ["cost_score", "cost_to_serve", "fill_rate", "bullwhip", "total_cost"],
    "resource_allocation_v0": ["slo_attainment", "utilization", "jain", "p95_wait", "mean_wait"],
}
POLICIES = ("random", "heuristic", "learned_sampled", "learned_greedy")


# --- training --------------------------------------------------------------------------------------
def train_command(env: str, env_args: dict, seed: int, minutes: float, curve: Path, ckpt: Path, bootstrap: str,
                  home: Path, prefix: str, window: int | None, sets: list[str]) -> list[str]:
    """``./dev train-online --curriculum`` for one run (no evaluation there: this script's is per stage)."""
    cmd = ["./dev", "train-online", "--env", env, "--algo", "mappo", "--curriculum", "--minutes", str(minutes),
           "--seed", str(seed), "--out", str(curve), "--checkpoint", str(ckpt), "--eval-episodes", "0",
           "--bootstrap", bootstrap, "--home", str(home), "--prefix", prefix, "--no-progress"]
    if window is not None:
        cmd += ["--curriculum-window", str(window)]
    for k, v in env_args.items():
        cmd += ["--env-arg", f"{k}={json.dumps(v)}"]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def tree_state() -> dict:
    """The commit and the uncommitted files the run was made with (others edit the tree meanwhile)."""
    git = lambda *c: subprocess.run(["git", *c], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {"git_head": git("rev-parse", "HEAD"), "git_uncommitted": git("status", "--short").splitlines()}


def stage_timeline(curve: dict) -> list[dict]:
    """Each stage change of a learning-curve file: the decision (``curriculum.changes``) with the update
    after which it was made (the row whose ``stage_changes`` names it: its batch was played at the old
    stage, the next one at the new), that row's env steps and seconds, and the last episode of the window."""
    rows = [(r, c) for r in curve["curve"] for c in r.get("stage_changes", ())]
    changes = curve.get("curriculum", {}).get("changes", [])
    if len(rows) != len(changes):
        raise ValueError(f"the curve names {len(rows)} stage changes, its curriculum summary {len(changes)}")
    return [{"update": r["iteration"], "env_steps": r["env_steps"], "seconds": r["seconds"],
             "episode": d["episodes"][-1] if d["episodes"] else None, "from": d["from_stage"], "to": d["to_stage"],
             "reason": d["reason"], "metric": d["metric"], "threshold": d["threshold"],
             "window_mean": d["stats"]["mean"], "trend": d["stats"]["trend"], "text": text}
            for (r, text), d in zip(rows, changes)]


def stage_events(bootstrap: str, prefix: str, run_id: str) -> list[dict]:
    """The run's curriculum.stage events as read back from Kafka (payload fields an auditor compares)."""
    from eventlog.codec import default_codec
    from eventlog.kafka import read_records

    codec = default_codec()
    out = []
    for r in read_records(bootstrap, [STAGE_TOPIC], prefix=prefix):
        if r.key != f"{run_id}:curriculum":
            continue
        name, rec = codec.decode(r.value)
        out.append({"seq": rec["seq"], "event": name, "from": rec["from_stage"], "to": rec["to_stage"],
                    "reason": rec["reason"], "window_mean": rec["window_mean"], "trend": rec["trend"],
                    "window_episodes": [rec["window_episodes"][0], rec["window_episodes"][-1]],
                    "policy_version": rec["policy_version"]})
    return sorted(out, key=lambda e: e["seq"])


# --- evaluation ------------------------------------------------------------------------------------
def evaluate_stages(env_name: str, env_args: dict, seed: int, ckpt: Path, home: Path, stages: list[str],
                    episodes: int) -> dict:
    """Every policy of the table at each of ``stages`` (``set_stage`` then the evaluation seeds)."""
    import torch

    from eventlog.checkpoint import Signer
    from learners.checkpoint import learner_from_checkpoint
    from learners.evaluate import GreedyPolicy
    from producers.envs import make_env
    from producers.policies import HeuristicPolicy, RandomPolicy

    torch.set_num_threads(1)
    public_key = Signer.load_or_create(home / "keys" / "signing.pem").public_key
    learner = learner_from_checkpoint(ckpt, public_key)  # refuses a checkpoint whose signature fails
    env, _, _ = make_env(env_name, **env_args)
    out: dict[str, Any] = {"learner_version": learner.version, "optimizer_steps": learner.optimizer_steps,
                           "episodes": episodes, "eval_seed": EVAL_SEED, "stages": {}}
    for stage in stages:
        env.set_stage(stage)
        policies = {"random": RandomPolicy(env, seed=seed), "heuristic": HeuristicPolicy(env),
                    "learned_sampled": learner, "learned_greedy": GreedyPolicy(learner)}
        out["stages"][stage] = {name: episode_metrics(env, p, episodes) for name, p in policies.items()}
    return out


# --- summary, tables, figures ------------------------------------------------------------------------
def spread(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "values": xs}


def summarize(out_dir: Path) -> dict:
    runs = [json.loads(p.read_text()) for p in sorted(out_dir.glob("run_*.json"))]
    summary: dict[str, Any] = {"spread": "sample standard deviation over training seeds (n-1), plus min and max; "
                                         "per stage, over the seeds that reached it", "experiments": {}}
    for tag, env, env_args in EXPERIMENTS:
        mine = [r for r in runs if r["tag"] == tag and "eval" in r]
        if not mine:
            continue
        stages: dict[str, dict] = {}
        for stage in mine[0]["stages"]:
            reached = [r for r in mine if stage in r["eval"]["stages"]]
            if not reached:
                continue
            stages[stage] = {"seeds": [r["seed"] for r in reached], "policies": {
                pol: {k: spread([r["eval"]["stages"][stage][pol][k] for r in reached])
                      for k in reached[0]["eval"]["stages"][stage][pol]} for pol in POLICIES}}
        summary["experiments"][tag] = {
            "env": env, "env_args": env_args, "algo": "mappo", "seeds": [r["seed"] for r in mine],
            "train_minutes": mine[0]["minutes"], "env_steps": [r["env_steps"] for r in mine],
            "updates": [r["updates"] for r in mine], "verified": [r.get("verify", {}).get("ok") for r in mine],
            "highest": {str(r["seed"]): r["highest"] for r in mine},
            "final": {str(r["seed"]): r["final"] for r in mine},
            "changes": {str(r["seed"]): r["timeline"] for r in mine}, "eval_episodes": mine[0]["eval_episodes"],
            "table_metrics": TABLE_METRICS[env], "criteria": mine[0]["criteria"], "stages": stages}
    probes = {p.stem: json.loads(p.read_text()) for p in sorted(out_dir.glob("probe_*.json"))}
    summary["continuous_probes"] = {name: {**{k: v for k, v in pr.items() if k != "verify"},
                                           "verified": pr.get("verify", {}).get("ok")} for name, pr in probes.items()}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def print_tables(summary: dict) -> None:
    for name, pr in summary.get("continuous_probes", {}).items():
        print(f"{name}: {pr.get('updates')} updates, {pr.get('env_steps')} env steps, team return first 3 "
              f"{pr.get('first3_return')} -> last 3 {pr.get('last3_return')}, hardest stage {pr.get('highest')}, "
              f"verified {pr.get('verified')}")
        main = TABLE_METRICS[pr["env"]][0]
        for st, pols in pr.get("eval", {}).get("stages", {}).items():
            print(f"  at {st}: " + "; ".join(f"{n} team_return {m['team_return']:.4g} {main} {m[main]:.4g}"
                                             for n, m in pols.items()))
    for tag, ex in summary["experiments"].items():
        print(f"\n## {tag} ({ex['env']} {ex['env_args']}, seeds {ex['seeds']}, {ex['train_minutes']} min each, "
              f"env steps {ex['env_steps']}, updates {ex['updates']}, verified {ex['verified']})")
        print(f"hardest stage reached {ex['highest']}, final {ex['final']}")
        for seed, tl in ex["changes"].items():
            for c in tl:
                print(f"  seed {seed}: after update {c['update']} ({c['env_steps']} env steps, {c['seconds']} s, "
                      f"episode {c['episode']}): {c['text']}")
        cols = ["team_return", *ex["table_metrics"]]
        for stage, st in ex["stages"].items():
            print(f"\n### at {stage} (seeds {st['seeds']}; criterion {ex['criteria'][stage]})")
            print("| policy | " + " | ".join(cols) + " |")
            for pol, row in st["policies"].items():
                print(f"| {pol} | " + " | ".join(f"{row[c]['mean']:.4g} ± {row[c]['std']:.2g}" for c in cols) + " |")


def plot(summary: dict, out_dir: Path, img_dir: Path) -> list[Path]:
    """One PNG per env: team return per update against env steps, each seed a colour, a dotted line
    after the update whose batch decided a stage change (labelled with the new stage; ^ promoted,
    v regressed); below, the stage each update's batch was played at, over the env steps it took."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for tag, ex in summary["experiments"].items():
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=[3, 1.3])
        stages: list[str] = []
        for i, seed in enumerate(ex["seeds"]):
            curve = json.loads((out_dir / f"curve_{tag}_s{seed}.json").read_text())
            stages = curve["curriculum"]["stages"]
            rows = curve["curve"]
            x = [r["env_steps"] for r in rows]
            c = colours[i % len(colours)]
            top.plot(x, [r["charts/episodic_return"] for r in rows], color=c, lw=1.2, label=f"seed {seed}")
            # each batch is played at its stage from the previous update's env steps to its own
            level = [r["stage_index"] + 0.04 * (i - 1) for r in rows]
            bottom.step([0, *x], [*level, level[-1]], where="post", color=c, lw=1.2)
            changes = ex["changes"][str(seed)]
            for ch in changes:
                top.axvline(ch["env_steps"], color=c, ls=":", lw=1)
                if len(changes) > 8:  # dozens of labels would hide the curves; the stage panel names them
                    continue
                mark = "^" if ch["reason"] == "promoted" else "v"
                top.annotate(f"{mark} {ch['to']}", (ch["env_steps"], 1.0), xycoords=("data", "axes fraction"),
                             rotation=90, va="top", ha="right", fontsize=7, color=c)
        top.set_ylabel("team return per episode\n(mean of the update's batch)")
        top.set_title(f"{ex['env']}: MAPPO with --curriculum through Kafka, {ex['train_minutes']} min per seed"
                      + (" (discrete actions)" if ex["env_args"].get("continuous_actions") is False else ""),
                      fontsize=10)
        top.legend(fontsize=8, loc="lower right")
        top.grid(alpha=0.3)
        bottom.set_yticks(range(len(stages)), stages, fontsize=8)
        bottom.set_ylim(-0.5, len(stages) - 0.5)
        bottom.set_ylabel("stage")
        bottom.set_xlabel("env steps")
        bottom.grid(alpha=0.3)
        fig.tight_layout()
        path = img_dir / f"seed004_{ex['env']}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# --- driver ----------------------------------------------------------------------------------------
def run_one(tag: str, env: str, env_args: dict, seed: int, a: argparse.Namespace) -> dict:
    stamp = time.strftime("%Y%m%d%H%M%S")
    prefix = f"seed004-{tag}-s{seed}-{stamp}"
    curve_path = a.out_dir / f"curve_{tag}_s{seed}.json"
    ckpt = a.home / "checkpoints" / f"{tag}_s{seed}" / "policy"
    cmd = train_command(env, env_args, seed, a.minutes, curve_path, ckpt, a.bootstrap, a.home, prefix, a.window,
                        a.sets)
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    wall = time.time() - t0
    rec: dict[str, Any] = {"tag": tag, "env": env, "env_args": env_args, "algo": "mappo", "seed": seed,
                           "minutes": a.minutes, "transport": f"kafka {a.bootstrap}", "prefix": prefix,
                           "home": str(a.home), "command": " ".join(cmd), "rc": proc.returncode,
                           "wall_s": round(wall, 1), "eval_episodes": a.eval_episodes, "sets": a.sets,
                           "load_average": os.getloadavg(), **tree_state()}
    if proc.returncode != 0:
        rec["stderr_tail"] = proc.stderr[-3000:]
        print(f"  FAILED rc {proc.returncode}: {proc.stderr[-1500:]}", flush=True)
        return rec
    from producers.envs import make_env

    run_id = proc.stdout.strip().splitlines()[-1]
    curve = json.loads(curve_path.read_text())
    rows, cur = curve["curve"], curve["curriculum"]
    e, _, _ = make_env(env, **env_args)
    rec |= {"run_id": run_id, "updates": len(rows), "env_steps": rows[-1]["env_steps"] if rows else 0,
            "episodes": rows[-1]["episodes"] if rows else 0, "stages": cur["stages"],
            "curriculum_config": cur["config"],
            "criteria": dict(e.CURRICULUM), "highest": cur["highest"], "final": cur["final"],
            "timeline": stage_timeline(curve), "curve_tail": [r["charts/episodic_return"] for r in rows[-10:]]}
    for c in rec["timeline"]:
        print(f"  after update {c['update']} ({c['env_steps']} env steps, {c['seconds']} s): {c['text']}", flush=True)
    verify_cmd = ["./dev", "verify", "--run", run_id, "--require-signed", "--json", "--bootstrap", a.bootstrap,
                  "--home", str(a.home), "--prefix", prefix]
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(verify_cmd)}", flush=True)
    rec["verify"] = verify_run(run_id, a.bootstrap, a.home, prefix)
    print(f"  verify ok={rec['verify']['ok']} ({rec['verify'].get('report')}, {rec['verify']['seconds']} s)",
          flush=True)
    rec["stage_events"] = stage_events(a.bootstrap, prefix, run_id)
    rec["stage_events_match_curve"] = [(ev["from"], ev["to"], ev["reason"]) for ev in rec["stage_events"]] == \
        [(c["from"], c["to"], c["reason"]) for c in rec["timeline"]]
    print(f"  {len(rec['stage_events'])} curriculum.stage events read back from Kafka; same as the curve: "
          f"{rec['stage_events_match_curve']}", flush=True)
    reached = cur["stages"][:cur["stages"].index(cur["highest"]) + 1]
    t1 = time.time()
    rec["eval"] = evaluate_stages(env, env_args, seed, ckpt, a.home, reached, a.eval_episodes)
    rec["eval_s"] = round(time.time() - t1, 1)
    main = TABLE_METRICS[env][0]
    for stage, pols in rec["eval"]["stages"].items():
        print(f"  at {stage}: " + "; ".join(f"{n} {main} {m[main]:.3g}" for n, m in pols.items()), flush=True)
    return rec


def probe_continuous(tag: str, env: str, env_args: dict, a: argparse.Namespace) -> dict:
    """For an experiment run with discrete actions: the same training (first seed, same budget, through
    Kafka, verified) with the env's default continuous actions, to show why. Its curve goes to
    ``curve_TAG_continuous_sS.json``; the record compares the first and last 3 updates' team return."""
    seed = a.seeds[0]
    args = {k: v for k, v in env_args.items() if k != "continuous_actions"}
    prefix = f"seed004-{tag}-continuous-s{seed}-{time.strftime('%Y%m%d%H%M%S')}"
    curve_path = a.out_dir / f"curve_{tag}_continuous_s{seed}.json"
    ckpt = a.home / "checkpoints" / f"{tag}_continuous_s{seed}" / "policy"
    cmd = train_command(env, args, seed, a.minutes, curve_path, ckpt, a.bootstrap, a.home, prefix, a.window, a.sets)
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    rec: dict[str, Any] = {"tag": tag, "env": env, "env_args": args, "seed": seed, "minutes": a.minutes,
                           "prefix": prefix, "command": " ".join(cmd), "rc": proc.returncode}
    if proc.returncode != 0:
        rec["stderr_tail"] = proc.stderr[-3000:]
        print(f"  FAILED rc {proc.returncode}: {proc.stderr[-1500:]}", flush=True)
        return rec
    run_id = proc.stdout.strip().splitlines()[-1]
    curve = json.loads(curve_path.read_text())
    ret = [r["charts/episodic_return"] for r in curve["curve"]]
    rec |= {"run_id": run_id, "updates": len(ret), "env_steps": curve["curve"][-1]["env_steps"] if ret else 0,
            "first3_return": statistics.fmean(ret[:3]) if ret else None,
            "last3_return": statistics.fmean(ret[-3:]) if ret else None, "best_return": max(ret, default=None),
            "highest": curve["curriculum"]["highest"], "timeline": stage_timeline(curve),
            "verify": verify_run(run_id, a.bootstrap, a.home, prefix)}
    stages = curve["curriculum"]["stages"]
    rec["eval"] = evaluate_stages(env, args, seed, ckpt, a.home, stages[:stages.index(rec["highest"]) + 1],
                                  a.eval_episodes)
    main = TABLE_METRICS[env][0]
    print(f"  continuous: {rec['updates']} updates, team return first 3 {rec['first3_return']:.4g} -> last 3 "
          f"{rec['last3_return']:.4g}; hardest stage {rec['highest']}; verify ok={rec['verify']['ok']}; "
          + "; ".join(f"at {st}: " + ", ".join(f"{n} {main} {m[main]:.3g}" for n, m in pols.items())
                      for st, pols in rec["eval"]["stages"].items()), flush=True)
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap", default="127.0.0.1:49901", help="Kafka broker")
    p.add_argument("--minutes", type=float, default=2.0, help="training wall time per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--eval-episodes", type=int, default=100, help="evaluation episodes per policy and stage")
    p.add_argument("--window", type=int, default=None, help="--curriculum-window (default: train-online's)")
    p.add_argument("--only", nargs="+", default=[t for t, *_ in EXPERIMENTS], help="experiment tags to run")
    p.add_argument("--set", action="append", default=[], dest="sets", help="learner config override (all runs)")
    p.add_argument("--home", type=Path, default=HOME, help="scratch marlgrc home (signing key, checkpoints)")
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    p.add_argument("--img-dir", type=Path, default=IMG_DIR)
    p.add_argument("--summarize-only", action="store_true")
    p.add_argument("--no-probe", action="store_true",
                   help="skip the continuous-action run of the experiments that use discrete actions")
    a = p.parse_args()
    if a.bootstrap == "memory":
        p.error("--bootstrap memory: seed 004's evidence goes through Kafka (verify reads the topics); give a broker")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    if not a.summarize_only:
        for tag, env, env_args in EXPERIMENTS:
            if tag not in a.only:
                continue
            for seed in a.seeds:
                rec = run_one(tag, env, env_args, seed, a)
                (a.out_dir / f"run_{tag}_s{seed}.json").write_text(json.dumps(rec, indent=1))
            if env_args.get("continuous_actions") is False and not a.no_probe:
                rec = probe_continuous(tag, env, env_args, a)
                (a.out_dir / f"probe_{tag}_continuous_s{a.seeds[0]}.json").write_text(json.dumps(rec, indent=1))
    summary = summarize(a.out_dir)
    print_tables(summary)
    for path in plot(summary, a.out_dir, a.img_dir):
        print(f"figure {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
