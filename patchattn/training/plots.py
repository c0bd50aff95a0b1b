"""Loss curves of the recipes (matplotlib is the optional ``plot`` extra)."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend; matplotlib is the optional ``plot`` extra, so a missing one
    says how to install it (recipes call this before training, not after)."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the loss-curve plot needs matplotlib: pip install 'patchattn[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(records: list[dict], path: Path, title: str, stage_titles: dict[int, str] | None = None) -> None:
    """Training loss per step (and the held-out loss where logged) with held-out perplexity on a second axis; one
    panel per stage (``stage_titles``)."""
    plt = pyplot()

    stages = sorted({r.get("stage", 0) for r in records}) or [0]
    fig, axes = plt.subplots(1, len(stages), figsize=(7 * len(stages), 4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rows = [r for r in records if r.get("stage", 0) == stage and r["step"] > 0]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
        held = [r for r in records if r.get("stage", 0) == stage and r.get("eval_loss") is not None]
        if held:
            ax.plot([r["step"] for r in held], [r["eval_loss"] for r in held], "s--", label="held-out loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        evals = [r for r in records if r.get("stage", 0) == stage and r.get("eval_ppl") is not None]
        if evals:
            ax2 = ax.twinx()
            ax2.plot([r["step"] for r in evals], [r["eval_ppl"] for r in evals], "o-", color="tab:red",
                     label="held-out ppl")
            ax2.set_ylabel("held-out perplexity")
            ax2.legend(loc="upper right")
        ax.legend(loc="upper left")
        ax.set_title((stage_titles or {}).get(stage, title))
    if stage_titles:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
