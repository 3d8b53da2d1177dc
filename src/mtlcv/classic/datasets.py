"""Multi-task problems for the classic estimators: real data bundled with scikit-learn (nothing is
downloaded) and two synthetic problems built to favour sharing.

* ``digits`` — the UCI optical handwritten digits bundled with scikit-learn (1,797 8×8 images,
  64 pixel features): ten one-vs-rest tasks ``is_0 … is_9`` on the same images (logistic loss).
  Default training set: 10 % of the images (about 180, 18 per digit), the rest is the test set:
  the few-samples regime multi-task learning is meant for (with 70 % every single-task model is
  near its ceiling).
* ``linnerud`` — Linnerud's physiological data (Tenenhaus 1998): 20 middle-aged men, three
  exercise counts (chins, sit-ups, jumps) as features, three regression tasks ``weight``,
  ``waist``, ``pulse`` (squared loss). 14 men train, 6 test.
* ``diabetes`` — the diabetes data of Efron et al., "Least angle regression", Ann. Statist.
  2004 (442 patients, disease progression after one year). Our third data set: the tasks are
  four patient groups, sex × age (< 50, >= 50 years), each predicting progression from the
  other nine baseline variables (age, BMI, blood pressure, six serum measurements). It gives
  multi-task learning a real chance where the other two give little: every group is small
  (83–131 patients, 30 % of them for training), the groups' input distributions differ (age,
  and the serum values that go with it and with sex) while the biology that links BMI, blood
  pressure and serum lipids to progression is largely shared, the setting of the school and
  patient-group benchmarks of the MTL literature (tasks = sub-populations), and one where
  instance transfer has something to match.
* ``sparse`` — synthetic: 8 regression tasks on 50 features of which the same 5 matter for all
  (a shared sparse support, the case ℓ2,1 is built for), 25 training samples per task.
* ``lowrank`` — synthetic: 8 regression tasks whose weight vectors span 2 dimensions of 30
  (low-rank weights, the case the trace norm is built for), 20 training samples per task.

Every problem is a deterministic function of its seed (the split, and for the synthetic ones
the data).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError


@dataclass
class TaskData:
    """A multi-task problem: one array per task for training and test."""

    name: str
    tasks: list[str]
    loss: str
    X_train: list[np.ndarray]
    y_train: list[np.ndarray]
    X_test: list[np.ndarray]
    y_test: list[np.ndarray]
    train_size: float


def _split(n: int, frac: float, rng: np.random.Generator, strata: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Random train/test indices, ``frac`` of every stratum for training (at least 2 of each)."""
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(strata == c)
                                                      for c in np.unique(strata)]
    train = []
    for idx in groups:
        k = min(len(idx) - 1, max(2, int(round(frac * len(idx)))))
        train.append(rng.permutation(idx)[:k])
    tr = np.sort(np.concatenate(train))
    return tr, np.setdiff1d(np.arange(n), tr)


def digits(seed: int, train_size: float = 0.1) -> TaskData:
    from sklearn.datasets import load_digits

    d = load_digits()
    X, label = d.data / 16.0, d.target
    tr, te = _split(len(X), train_size, np.random.default_rng([seed, 1]), label)
    tasks = [f"is_{k}" for k in range(10)]
    return TaskData("digits", tasks, "logistic",
                    [X[tr]] * 10, [(label[tr] == k).astype(np.int64) for k in range(10)],
                    [X[te]] * 10, [(label[te] == k).astype(np.int64) for k in range(10)],
                    train_size)


def linnerud(seed: int, train_size: float = 0.7) -> TaskData:
    from sklearn.datasets import load_linnerud

    d = load_linnerud()
    X, Y = d.data.astype(np.float64), d.target.astype(np.float64)
    tr, te = _split(len(X), train_size, np.random.default_rng([seed, 2]))
    tasks = [n.lower() for n in d.target_names]
    return TaskData("linnerud", tasks, "squared", [X[tr]] * 3, [Y[tr, k] for k in range(3)],
                    [X[te]] * 3, [Y[te, k] for k in range(3)], train_size)


def diabetes(seed: int, train_size: float = 0.3) -> TaskData:
    from sklearn.datasets import load_diabetes

    d = load_diabetes(scaled=False)
    X, y = d.data.astype(np.float64), d.target.astype(np.float64)
    sex, age = X[:, 1], X[:, 0]
    features = np.delete(X, 1, axis=1)  # sex is constant within a task
    rng = np.random.default_rng([seed, 3])
    out: dict[str, list[np.ndarray]] = {"Xtr": [], "ytr": [], "Xte": [], "yte": []}
    tasks = []
    for s, sname in ((1, "sex1"), (2, "sex2")):
        for old, aname in ((False, "under50"), (True, "over50")):
            idx = np.flatnonzero((sex == s) & ((age >= 50) == old))
            tr, te = _split(len(idx), train_size, rng)
            out["Xtr"].append(features[idx[tr]])
            out["ytr"].append(y[idx[tr]])
            out["Xte"].append(features[idx[te]])
            out["yte"].append(y[idx[te]])
            tasks.append(f"{sname}_{aname}")
    return TaskData("diabetes", tasks, "squared", out["Xtr"], out["ytr"], out["Xte"],
                    out["yte"], train_size)


def _synthetic(name: str, W: np.ndarray, n_train: int, noise: float, seed: int) -> TaskData:
    rng = np.random.default_rng([seed, 4])
    d, T = W.shape
    Xtr = [rng.normal(size=(n_train, d)) for _ in range(T)]
    Xte = [rng.normal(size=(500, d)) for _ in range(T)]
    ytr = [X @ W[:, t] + noise * rng.normal(size=n_train) for t, X in enumerate(Xtr)]
    yte = [X @ W[:, t] + noise * rng.normal(size=500) for t, X in enumerate(Xte)]
    return TaskData(name, [f"task{t}" for t in range(T)], "squared", Xtr, ytr, Xte, yte,
                    float(n_train))


def sparse(seed: int, train_size: float = 25) -> TaskData:
    rng = np.random.default_rng([seed, 5])
    W = np.zeros((50, 8))
    support = rng.choice(50, 5, replace=False)
    W[support] = rng.normal(size=(5, 8))
    return _synthetic("sparse", W, int(train_size), 1.0, seed)


def lowrank(seed: int, train_size: float = 20) -> TaskData:
    rng = np.random.default_rng([seed, 6])
    W = rng.normal(size=(30, 2)) @ rng.normal(size=(2, 8))
    return _synthetic("lowrank", W, int(train_size), 1.0, seed)


DATASETS: dict[str, Callable[..., TaskData]] = {
    "digits": digits,
    "linnerud": linnerud,
    "diabetes": diabetes,
    "sparse": sparse,
    "lowrank": lowrank,
}


def load(name: str, seed: int = 0, train_size: float | None = None) -> TaskData:
    """The problem ``name`` split by ``seed``; ``train_size`` is a fraction of the samples
    (real data) or the training samples per task (synthetic); ``None`` = the default above."""
    if name not in DATASETS:
        raise ConfigError(f"classic: unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    fn = DATASETS[name]
    if train_size is None:
        return fn(seed)
    synthetic = name in ("sparse", "lowrank")
    if synthetic and not (train_size >= 3 and float(train_size).is_integer()):
        raise ConfigError(f"classic: --train-size for {name!r} is the number of training "
                          f"samples per task (an integer >= 3), got {train_size!r}")
    if not synthetic and not 0 < train_size < 1:
        raise ConfigError(f"classic: --train-size for {name!r} is a fraction in (0, 1), got "
                          f"{train_size!r}")
    return fn(seed, train_size)
