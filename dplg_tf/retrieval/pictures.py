"""Pictures (matplotlib, PNG): attention maps over images (the paper's Fig. 2)
and ranked-result sheets with green / red / grey borders for positive /
negative / junk database images."""

import os

from dplg_tf.images.attention import overlay
from dplg_tf.storage.atomic import atomic_path

COLOURS = {"positive": "#1a9850", "negative": "#d73027", "junk": "#999999", None: "#ffffff"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def attention_figure(pairs, path, title="Dot-product attention A (Eq. 2)"):
    """`pairs` [(image uint8, attention, caption)] side by side: image over map."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(pairs), figsize=(3 * len(pairs), 5.6), squeeze=False)
    for col, (image, attention, caption) in enumerate(pairs):
        axes[0, col].imshow(image)
        axes[0, col].set_title(caption, fontsize=9)
        axes[1, col].imshow(overlay(image, attention))
        for ax in axes[:, col]:
            ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


def ranked_sheet(query, results, path, title=""):
    """Query and its top-k: `results` [(image uint8, label, caption)],
    label in positive | negative | junk | None (unknown)."""
    plt = _pyplot()
    n = len(results) + 1
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.6))
    axes[0].imshow(query)
    axes[0].set_title("query", fontsize=9)
    for ax, (image, label, caption) in zip(axes[1:], results):
        ax.imshow(image)
        ax.set_title(caption, fontsize=8)
        for spine in ax.spines.values():
            spine.set_edgecolor(COLOURS[label])
            spine.set_linewidth(5)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


def write_figures(dataset, ranks, attention_of, output_dir, count, top_k=8):
    """Ranked sheets and attention figures for the first `count` queries;
    `attention_of(image)` is the model's attention map of an image."""
    from dplg_tf.images import load

    folder = os.path.join(output_dir, "figures")
    os.makedirs(folder, exist_ok=True)
    written = []
    for q in range(min(count, len(dataset.qimlist))):
        query = load(dataset.query_path(q), bbx=dataset.bbx(q))
        results = []
        for idx in ranks[:top_k, q]:
            if idx >= len(dataset.imlist):  # a distractor descriptor without an image
                continue
            results.append((load(dataset.image_path(idx)),
                            dataset.label(q, int(idx)), dataset.imlist[idx][:18]))
        written.append(ranked_sheet(query, results,
                                    os.path.join(folder, f"ranked_{q:03d}.png"),
                                    f"{dataset.name} query {dataset.qimlist[q]}"))
        top = int(ranks[0, q])
        pairs = [(query, attention_of(query), "query")]
        if top < len(dataset.imlist):
            image = load(dataset.image_path(top))
            pairs.append((image, attention_of(image), "top-1"))
        written.append(attention_figure(pairs, os.path.join(folder, f"attention_{q:03d}.png")))
    return written
