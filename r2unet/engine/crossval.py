"""k-fold cross-validation (``r2unet crossval``) and its fold ensemble.

The training and validation images of a prepared dataset are dealt into ``folds`` folds by a seeded hash of their
names (the test split is never touched). Fold k trains on the other folds, chooses its best checkpoint on fold k and
is tested on the test split, as a run of ``train`` in ``OUTPUT/fold_k`` on a dataset of links in
``OUTPUT/fold_k/data``. Then every fold's best model predicts its own held-out fold (the out-of-fold predictions,
``oof.npz``), on which the ensemble's postprocessing is chosen (``OUTPUT/postprocessing.json``), and the folds'
models, averaged, are scored on the test split beside each fold (``crossval.json``, a table in the log).

Resumable at any point: a finished fold (its ``results.json``) is not redone, a killed one continues from its
``last.pt`` (on the CPU bit-identical to an uninterrupted run), and ``fold`` runs one fold alone (on each of several
GPUs side by side; the last call, without it, finishes the rest). Started under torchrun, every fold trains on all
the processes. ``OUTPUT`` is then a model for ``evaluate``, ``predict`` and ``serve``: the ensemble with its
postprocessing (``inference.Segmenter``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..data.cache import cache_folder, split_cache
from ..data.pairs import SPLITS, checked_pairs, split_folders
from ..data.prepare import data_split, split_changes
from ..fileio import atomic_write_text
from . import distributed as D
from .checkpoint import RunFiles
from .config import ConfigError, TrainConfig
from .evaluation import evaluate_checkpoint, validation_predictions
from .inference import Segmenter
from .postprocess import choose
from .runtime import device_type
from .task import task_of
from .trainer import fit

FOLDS_FILE, OOF_FILE, REPORT_FILE = "folds.json", "oof.npz", "crossval.json"


def assign_folds(names: list[str], folds: int, seed: int) -> dict[str, int]:
    """Each image's fold: the names ordered by a seeded hash, dealt round-robin (folds differ in size by one at
    most; the same names and seed give the same folds on any machine)."""
    order = sorted(names, key=lambda n: hashlib.sha256(f"{seed}\0{n}".encode()).hexdigest())
    return {name: i % folds for i, name in enumerate(order)}


def fold_dir(root: Path, k: int) -> Path:
    return root / f"fold_{k}"


class CrossValidation:
    """The folds of ``cfg.data_path`` under ``cfg.output_dir``, each trained with ``cfg``'s other settings."""

    def __init__(self, cfg: TrainConfig, folds: int = 5, log=print):
        if folds < 2:
            raise ConfigError(f"--folds: at least 2, got {folds}")
        self.cfg, self.folds, self.log = cfg.validate(), folds, log
        self.root, self.data = Path(cfg.output_dir), Path(cfg.data_path)
        self.info = D.DistInfo()

    # ------------------------------------------------------------------------------------------------- the plan
    def plan(self) -> dict:
        """The fold of every training and validation image, made once and kept in ``folds.json``; a later call on
        data whose splits changed stops, saying what changed (the folds trained so far would not be comparable)."""
        members = data_split(self.data)["splits"]
        pool = sorted(members["train"] + members["valid"])
        if len(pool) < self.folds:
            raise ConfigError(f"--folds {self.folds}: {self.data} has only {len(pool)} training and validation "
                              "images")
        path = self.root / FOLDS_FILE
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved["folds"] != self.folds or saved["seed"] != self.cfg.seed:
                raise ConfigError(f"{self.root} holds a cross-validation of {saved['folds']} folds with --seed "
                                  f"{saved['seed']}; pass those, or choose another --output_dir")
            before = {"train": sorted(saved["assignment"]), "test": saved["test"]}
            changes = split_changes(before, {"train": pool, "test": members["test"]})
            if changes:
                raise ConfigError(f"{self.data} changed since {path} was made (" + "; ".join(changes)
                                  + "): its folds no longer cover the same images. Start a new --output_dir")
            return saved
        plan = {"folds": self.folds, "seed": self.cfg.seed, "data_path": str(self.data),
                "assignment": assign_folds(pool, self.folds, self.cfg.seed), "test": members["test"]}
        if self.info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(plan, indent=1) + "\n")
        return plan

    def fold_data(self, plan: dict, k: int) -> Path:
        """``fold_k/data``: a prepared dataset of links (train: the other folds, valid: fold k, test: the test
        split), made once; made again only if it is not what the plan says."""
        folder = fold_dir(self.root, k) / "data"
        wanted = {"train": sorted(n for n, f in plan["assignment"].items() if f != k),
                  "valid": sorted(n for n, f in plan["assignment"].items() if f == k), "test": sorted(plan["test"])}
        if folder.is_dir() and data_split(folder)["splits"] == wanted:
            return folder
        pairs = {p.image.name: p for s in SPLITS for p in checked_pairs(*split_folders(self.data, s))[0]}
        missing = sorted(n for names in wanted.values() for n in names if n not in pairs)
        if missing:
            raise ConfigError(f"{self.data}: {len(missing)} image(s) of the folds have no readable mask pair now "
                              f"({', '.join(missing[:5])})")
        building = folder.with_name("data.partial")
        shutil.rmtree(building, ignore_errors=True)
        for split, names in wanted.items():
            images, masks = split_folders(building, split)
            images.mkdir(parents=True)
            masks.mkdir(parents=True)
            for name in names:
                os.symlink(pairs[name].image.resolve(), images / name)
                os.symlink(pairs[name].mask.resolve(), masks / pairs[name].mask.name)
        shutil.rmtree(folder, ignore_errors=True)
        building.rename(folder)
        return folder

    # ---------------------------------------------------------------------------------------------- the folds
    def run(self, only: int | None = None, single: str | Path | None = None) -> dict | None:
        """Train the folds not yet done (``only``: that fold alone), then, once all are done, the out-of-fold
        predictions, the ensemble's postprocessing and its test scores (returned, and written to
        ``crossval.json``)."""
        if only is not None and not 0 <= only < self.folds:
            raise ConfigError(f"--fold: 0 to {self.folds - 1}, got {only}")
        if D.in_group():  # its folds' training joins and leaves the process group; it must be crossval's own
            raise ConfigError("crossval: start it as a command (under torchrun or not), not inside a process group")
        self.info = D.init_distributed(device_type(self.cfg.device), timeout_s=self.cfg.dist_timeout_s)
        try:
            plan = D.broadcast_object(self.plan())
            for k in ([only] if only is not None else range(self.folds)):
                self.run_fold(plan, k)
        finally:
            D.cleanup()
        if not self.info.is_main:  # what is left is one process's work, with no collectives: rank 0's
            return None
        done = [k for k in range(self.folds) if RunFiles(fold_dir(self.root, k)).results.is_file()]
        for k in done:
            if not (fold_dir(self.root, k) / OOF_FILE).is_file():
                self.out_of_fold(k)
        left = sorted(set(range(self.folds)) - set(done))
        if left:
            self.log(f"folds {', '.join(map(str, left))} still to train: run the same command without --fold "
                     "(or with each) to finish")
            return None
        return self.finish(single)

    def run_fold(self, plan: dict, k: int) -> None:
        """Fold k trained (or continued from its last.pt) on every process, unless it is done."""
        run = RunFiles(fold_dir(self.root, k))
        if D.broadcast_object(run.results.is_file()):
            return
        data = self.fold_data(plan, k) if self.info.is_main else fold_dir(self.root, k) / "data"
        if self.info.is_main and self.cfg.cache_dir is None:
            self.seed_caches(data, k)
        D.barrier()
        resume = D.broadcast_object(run.last.is_file())
        self.log(f"fold {k + 1}/{self.folds}: " + ("continuing from " + str(run.last) if resume else
                                                    f"training in {run.dir}"))
        fit(self.cfg.updated(data_path=str(data), output_dir=str(run.dir), resume=resume),
            log=self.log if self.info.is_main else (lambda *a, **k: None))

    def seed_caches(self, data: Path, k: int) -> None:
        """Fold k's caches, built before its training from the rows the other folds' caches already hold (the same
        files: each is decoded once for all folds, not once per fold); what none holds is decoded here, as training
        would. Only the folds' own caches give rows: their file lists never change while the cross-validation runs,
        so a row's index in a donor's meta is its index in the donor's arrays (a dataset that another command
        re-lays out meanwhile could swap them between the two reads). A shared ``--cache_dir`` carries rows over by
        itself."""
        targets, size = task_of(self.cfg).targets, self.cfg.image_size
        donors = [cache_folder(fold_dir(self.root, j) / "data", split, size, None, targets)
                  for j in range(self.folds) if j != k for split in SPLITS]
        for split in SPLITS:
            split_cache(data, split, size, targets=targets, num_workers=self.cfg.num_workers or None,
                        skip_bad=self.cfg.skip_bad, donors=[d for d in donors if d.is_dir()], log=self.log)

    def out_of_fold(self, k: int) -> None:
        """Fold k's best model's predictions of its own held-out images (at the network's size), kept in
        ``fold_k/oof.npz``."""
        run = RunFiles(fold_dir(self.root, k))
        segmenter = Segmenter(run.dir, device=self.cfg.device, postprocess="none", runtime="torch",
                              log=lambda *a: None)
        names, predictions, truths = validation_predictions(segmenter, segmenter.cfg.data_path,
                                                            segmenter.cfg.cache_dir, log=lambda *a: None)
        tmp = run.dir / f"oof.{os.getpid()}.partial.npz"  # folds finishing side by side may both get here
        np.savez_compressed(tmp, names=np.array(names), predictions=np.stack(predictions), truths=np.stack(truths))
        tmp.replace(run.dir / OOF_FILE)

    # ------------------------------------------------------------------------------------------- the ensemble
    def finish(self, single: str | Path | None = None) -> dict:
        """The ensemble's postprocessing chosen on the out-of-fold predictions, its test scores with and without
        it, each fold's and (``single``: a run of ``train`` on the same data) the single model's, in
        ``crossval.json`` and a table."""
        parts = [np.load(fold_dir(self.root, k) / OOF_FILE) for k in range(self.folds)]
        predictions = [p for part in parts for p in part["predictions"]]
        truths = [t for part in parts for t in part["truths"]]
        trained = TrainConfig.from_dict(json.loads((fold_dir(self.root, 0) / "config.json").read_text()))
        post = choose(predictions, truths, task_of(trained), trained.threshold,
                      f"the out-of-fold predictions of {self.folds} folds ({len(predictions)} images at "
                      f"{trained.image_size} px)")
        atomic_write_text(self.root / "postprocessing.json", json.dumps(post.to_dict(), indent=2) + "\n")
        ensemble = evaluate_checkpoint(self.root, self.data, split="test", device=self.cfg.device,
                                       log=lambda *a: None)
        rows = [_row(f"fold {k + 1}", json.loads(RunFiles(fold_dir(self.root, k)).results.read_text()))
                for k in range(self.folds)]
        rows.append({"name": f"ensemble of {self.folds}", "JS": ensemble.get("without_postprocessing", ensemble)["JS"],
                     "JS_ci": ensemble.get("without_spread", ensemble["spread"])["JS"]["ci"],
                     "DC": ensemble.get("without_postprocessing", ensemble)["DC"],
                     "post_JS": ensemble["JS"] if post.active else None,
                     "post_JS_ci": ensemble["spread"]["JS"]["ci"] if post.active else None})
        if single is not None:
            rows.append(_row(f"single run ({Path(single).name})", json.loads(RunFiles(single).results.read_text())))
        report = {"folds": self.folds, "postprocessing": post.to_dict(), "rows": rows, "ensemble": ensemble}
        atomic_write_text(self.root / REPORT_FILE, json.dumps(report, indent=2) + "\n")
        self.log(crossval_table(report, post))
        return report


def _row(name: str, results: dict) -> dict:
    """A table row of a run's results.json: its test JS with the 95 % interval, DC, and with its postprocessing."""
    test, spread = results["test"], results["test_spread"]
    post = results.get("test_postprocessed")
    return {"name": name, "JS": test["JS"], "JS_ci": spread["JS"]["ci"], "DC": test["DC"],
            "post_JS": post["JS"] if post else None,
            "post_JS_ci": results["test_postprocessed_spread"]["JS"]["ci"] if post else None}


def crossval_table(report: dict, post) -> str:
    lines = [f"test split, per-image means (95% CI); postprocessing of the ensemble, {post.headline()}",
             f"  {'':<24}{'JS':>7}  {'95% CI':<13}{'DC':>7}   {'JS postprocessed':<16}"]
    for row in report["rows"]:
        after = f"{row['post_JS']:.4f} ({row['post_JS_ci'][0]:.3f}-{row['post_JS_ci'][1]:.3f})" \
            if row["post_JS"] is not None else "-"
        lines.append(f"  {row['name']:<24}{row['JS']:>7.4f}  {row['JS_ci'][0]:.3f}-{row['JS_ci'][1]:.3f}  "
                     f"{row['DC']:>7.4f}   {after}")
    return "\n".join(lines)
