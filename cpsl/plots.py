"""PNG plots of training curves and modality-balance trajectories (matplotlib, Agg)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(history: list[dict], path: Path, title: str = "") -> None:
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    for k in history[0]["train"]:
        if not k.startswith("aux_"):
            ax[0, 0].plot(ep, [h["train"][k] for h in history], label=k)
    ax[0, 0].set_yscale("log"); ax[0, 0].set_title("train loss terms (unweighted)"); ax[0, 0].legend(fontsize=7)
    ax[0, 1].plot(ep, [h["valid"]["MAE"] for h in history], label="valid MAE")
    ax[0, 1].plot(ep, [h["train"]["task"] for h in history], label="train task loss")
    ax[0, 1].set_title("MAE"); ax[0, 1].legend(fontsize=7)
    for k in ("Corr", "Non0_acc_2", "Has0_acc_2"):
        ax[1, 0].plot(ep, [h["valid"][k] for h in history], label=k)
    ax[1, 0].set_title("valid metrics"); ax[1, 0].legend(fontsize=7)
    for m in history[0]["valid_aux"]:
        ax[1, 1].plot(ep, [h["valid_aux"][m]["MAE"] for h in history], label=f"{m} head")
    ax[1, 1].set_title("valid MAE of the unimodal auxiliary heads"); ax[1, 1].legend(fontsize=7)
    for a in ax.flat:
        a.set_xlabel("epoch"); a.grid(alpha=0.3)
    fig.suptitle(title); fig.tight_layout(); fig.savefig(path, dpi=90); plt.close(fig)


def plot_balance(history: list[dict], path: Path, title: str = "") -> None:
    hs = [h for h in history if h.get("balance")]
    fig, ax = plt.subplots(1, 4, figsize=(16, 3.6))
    if hs:
        ep = [h["epoch"] for h in hs]
        for m in hs[0]["balance"]["ghat"]:
            ax[0].plot(ep, [h["balance"]["ghat"][m] for h in hs], label=m)
            ax[1].plot(ep, [h["balance"]["r"][m] for h in hs], label=m)
            ax[2].plot(ep, [h["balance"]["k"][m] for h in hs], label=m)
            ax[3].plot(ep, [h["balance"]["conflict_rate"][m] for h in hs], label=m)
    for a, t in zip(ax, ("mean ĝ (gradient norm)", "mean r = ĝ/ḡ", "mean penalty k", "conflict rate")):
        a.set_title(t); a.set_xlabel("epoch"); a.grid(alpha=0.3); a.legend(fontsize=7)
    if not hs:
        ax[0].text(0.5, 0.5, "no modulation in this run", ha="center", transform=ax[0].transAxes)
    fig.suptitle(title); fig.tight_layout(); fig.savefig(path, dpi=90); plt.close(fig)


def plot_distill_curve(res: dict, path: Path) -> None:
    """Layer-wise distillation (cpsl.compress.layer_distill): valid MAE against the teacher and the
    ensemble, and the distillation losses, per epoch."""
    h = res["history"]
    ep = [r["epoch"] for r in h]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(ep, [r["valid"]["MAE"] for r in h], "o-", label=f"{res['layers']}-layer student")
    ax[0].axhline(res["teacher"]["valid"]["MAE"], color="k", ls="--", label="teacher")
    ax[0].axhline(res["ensemble"]["valid"]["MAE"], color="gray", ls=":", label="ensemble")
    ax[0].set_ylabel("MOSI valid MAE"); ax[0].legend(fontsize=8)
    for k in ("hidden", "relation", "kd", "kd_transfer"):
        if any(r.get(k) for r in h):
            ax[1].plot(ep, [max(r[k], 1e-8) for r in h], "o-", label=k)
    ax[1].set_yscale("log"); ax[1].set_ylabel("training loss (epoch mean)"); ax[1].legend(fontsize=8)
    for a in ax.flat:
        a.set_xlabel("epoch"); a.set_xticks(ep); a.grid(alpha=0.3)
    fig.tight_layout(); fig.savefig(path, dpi=100); plt.close(fig)


def plot_kfold_edge(ke: dict, path: Path) -> None:
    """The edge student of every k-fold teacher (cpsl.recipes.edge.edge_kfold): per fold, MAE and
    Non0_acc_2 of the teacher, the int8 student and its fp32 twin on the fold's valid rows."""
    pf = ke["per_fold"]
    folds = list(range(1, len(pf["teacher"]) + 1))
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    for a, m in zip(ax, ("MAE", "Non0_acc_2")):
        for key, style, label in (("teacher", "ko--", "teacher"), ("student_fp32", "s:", "student fp32"),
                                  ("student", "o-", f"{ke['layers']}-layer {ke['precision']} student")):
            a.plot(folds, [r[m] for r in pf[key]], style, label=label)
        a.set_xlabel("fold"); a.set_ylabel(f"fold valid {m}"); a.set_xticks(folds); a.grid(alpha=0.3)
    ax[0].legend(fontsize=8)
    ret = ke["retention_non0_acc2"]
    ax[1].set_title(f"Non0_acc_2 retention {ret['mean']:.1%}", fontsize=9)
    ax[0].set_title(f"MAE change {ke['mae_vs_teacher']['mean']:+.1%}", fontsize=9)
    fig.tight_layout(); fig.savefig(path, dpi=100); plt.close(fig)
