"""The paper's ablations of MEND (its Table 6) on one task: each variant trained with the same budget and seed.

    python -m benchmarks.ablations --threads 1 --out outputs/compare     # embedded SmolLM2-135M on gen
    python -m benchmarks.ablations --variants "MEND,no norm" --steps 100

Each variant is MEND with one part taken away or changed: no parameter sharing between the editors of weights of
one shape (``mend.shared=false``), no input normalisation (``mend.norm=false``), Xavier instead of identity
initialisation (``mend.init=xavier``), an editor of the input side only (``x_only``), of the output-gradient side
only (``delta_only``) or of the smaller side only (``one_sided``; these three need ``mend.combine=false``), and a
rank of 192 instead of 1920. The runs go through ``python -m run`` exactly as in ``benchmarks.compare_editors``
(same options, same skipping of finished runs), so with the same ``--out`` the plain MEND run of a comparison is
reused. Written to ``--out``: ``ablations.csv``, ``ablations.md`` and ``ablations.png``, with the paper's Wikitext
figures (distilGPT-2, Table 6) beside each row. Arguments after ``--`` go to every run as Hydra overrides.
"""

from __future__ import annotations

from benchmarks.compare_editors import cli

# name -> (alg, overrides that make it this variant)
VARIANTS = {
    "MEND": ("mend", []),
    "no sharing": ("mend", ["mend.shared=false"]),
    "no norm": ("mend", ["mend.norm=false"]),
    "no ID init": ("mend", ["mend.init=xavier"]),
    "only u (x_only)": ("mend", ["mend.combine=false", "mend.x_only=true"]),
    "only delta (delta_only)": ("mend", ["mend.combine=false", "mend.delta_only=true"]),
    "only smaller (one_sided)": ("mend", ["mend.combine=false", "mend.one_sided=true"]),
    "rank 192": ("mend", ["mend.rank=192"]),
}
# The paper's Table 6 (edit success / perplexity drawdown), Wikitext generation with distilGPT-2; it has no
# rank ablation.
PAPER_GEN = {
    "MEND": "0.86 / 0.225",
    "no sharing": "0.86 / 0.195",
    "no norm": "0.02 / 0.370",
    "no ID init": "0.27 / 0.898",
    "only u (x_only)": "0.63 / 0.559",
    "only delta (delta_only)": "0.80 / 0.445",
    "only smaller (one_sided)": "0.80 / 0.593",
}
# Table 6, zsRE question answering with BART-base (edit success / accuracy drawdown).
PAPER_QA = {
    "MEND": ">0.99 / 0.001",
    "no sharing": ">0.99 / 0.001",
    "no norm": "0.97 / <0.001",
    "no ID init": "0.94 / <0.001",
    "only u (x_only)": "0.98 / 0.002",
    "only delta (delta_only)": "0.99 / 0.001",
    "only smaller (one_sided)": "0.98 / 0.002",
}
PAPER = {"gen": PAPER_GEN, "qa": PAPER_QA}


def main(argv=None) -> None:
    cli(argv, __doc__, VARIANTS, "variants", PAPER, "ablations", label="MEND ablations, ")


if __name__ == "__main__":
    main()
