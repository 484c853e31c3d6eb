"""Summarize issue 17's simple_spread_v3 runs: results/issue17/{ablation,screen300k,kafka}/NAME_sSEED.json (written by
`marlgrc train-online --out`) -> per NAME: greedy and sampled evaluation (100 episodes, seeds 10000..10099)
per seed, mean, sample std and min..max, env steps, training wall seconds and env steps/s (training loop
only, evaluation excluded). Usage: ./dev python results/issue17/summarize.py [ablation|screen300k|kafka] [--json OUT]"""
import json
import re
import statistics
import sys
from pathlib import Path

here = Path(__file__).parent


def summarize(kind: str) -> dict:
    groups: dict = {}
    for p in sorted((here / kind).glob("*_s*.json")):
        m = re.fullmatch(r"(.+)_s(\d+)", p.stem)
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError:  # being rewritten by a running `--out`
            continue
        if "policies" not in d:  # still running (no evaluation yet)
            continue
        last = d["curve"][-1]
        groups.setdefault(m.group(1), {})[int(m.group(2))] = {
            "greedy": d["policies"]["learned (greedy)"]["mean_return"],
            "sampled": d["policies"]["learned (sampled)"]["mean_return"],
            "train_last10": statistics.fmean(r["charts/episodic_return"] for r in d["curve"][-10:]),
            "env_steps": last["env_steps"], "seconds": last["seconds"],
            "steps_per_s": last["env_steps"] / last["seconds"], "transport": d["transport"],
            "config": {k: v for k, v in d["config"].items() if k != "seed"}}
    out = {}
    for name, seeds in groups.items():
        g = [r["greedy"] for r in seeds.values()]
        out[name] = {"seeds": seeds, "greedy_mean": statistics.fmean(g),
                     "greedy_std": statistics.stdev(g) if len(g) > 1 else 0.0, "greedy_min": min(g), "greedy_max": max(g),
                     "sampled_mean": statistics.fmean(r["sampled"] for r in seeds.values()),
                     "seconds_mean": statistics.fmean(r["seconds"] for r in seeds.values()),
                     "steps_per_s_mean": statistics.fmean(r["steps_per_s"] for r in seeds.values())}
    return out


if __name__ == "__main__":
    kind = sys.argv[1] if len(sys.argv) > 1 else "ablation"
    s = summarize(kind)
    for name, r in s.items():
        per = "  ".join(f"s{k} {v['greedy']:.1f}" for k, v in sorted(r["seeds"].items()))
        print(f"{name:14s} greedy {r['greedy_mean']:6.1f} ± {r['greedy_std']:4.1f} [{r['greedy_min']:.1f}..{r['greedy_max']:.1f}]"
              f"  ({per})  sampled {r['sampled_mean']:6.1f}  {r['seconds_mean']:6.0f} s  {r['steps_per_s_mean']:5.0f} steps/s")
    if "--json" in sys.argv:
        Path(sys.argv[sys.argv.index("--json") + 1]).write_text(json.dumps(s, indent=1))
