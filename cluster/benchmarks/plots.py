"""Plots of results.jsonl, written beside it when matplotlib is installed (it is optional:
GPU machines may lack it; the JSON lines are the record either way)."""
import json
from pathlib import Path


def _load(out_dir: Path) -> list[dict]:
    path = out_dir / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_plots(out_dir: str | Path) -> list[Path]:
    """One PNG per benchmark kind present in out_dir/results.jsonl; returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out_dir = Path(out_dir)
    rows = _load(out_dir)
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        written.append(out_dir / name)

    throughput = [r for r in rows if r["bench"] == "throughput"]
    if throughput:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = [f"{r['engine']}\n{r.get('path', '')} dp{r.get('dp', 1)}" for r in throughput]
        ax.bar(labels, [r["output_tok_per_s"] for r in throughput])
        ax.set_ylabel("output tokens / s")
        ax.set_title(f"Offline throughput, {throughput[-1]['device']}")
        save(fig, "throughput.png")
    latency = [r for r in rows if r["bench"] == "latency"]
    if latency:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["batch"] for r in latency], [r["mean_tpot_ms"] for r in latency], "o-", label="TPOT")
        ax.plot([r["batch"] for r in latency], [r["mean_ttft_ms"] for r in latency], "s-", label="TTFT")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel("ms")
        ax.legend()
        ax.set_title(f"Latency (128 in / 512 out), {latency[-1]['device']}")
        save(fig, "latency.png")
    prefix = [r for r in rows if r["bench"] == "prefix_cache"]
    if prefix:
        r = prefix[-1]
        fig, ax = plt.subplots(figsize=(4, 3.5))
        ax.bar(["cold", "warm"], [r["cold_ttft_ms"], r["warm_ttft_ms"]])
        ax.set_ylabel("time to first token, ms")
        ax.set_title(f"{r['prefix_len']}-token shared prefix, {r['device']}")
        save(fig, "prefix_cache.png")
    scaling = [r for r in rows if r["bench"] == "dp_scaling"]
    if scaling:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for k in sorted({r.get("num_scheduler_steps", 1) for r in scaling}):
            runs = sorted((r for r in scaling if r.get("num_scheduler_steps", 1) == k), key=lambda r: r["dp"])
            ax.plot([r["dp"] for r in runs], [r["output_tok_per_s"] for r in runs], "o-",
                    label=f"num_scheduler_steps {k}")
        ones = [r for r in scaling if r["dp"] == 1]
        if ones:
            dps = sorted({r["dp"] for r in scaling})
            ax.plot(dps, [d * ones[0]["output_tok_per_s"] for d in dps], "k:", label="linear")
        ax.set_xlabel("data parallel size")
        ax.set_ylabel("output tokens / s")
        ax.legend()
        ax.set_title(f"Data-parallel scaling, {scaling[-1]['device']}")
        save(fig, "dp_scaling.png")
    return written
