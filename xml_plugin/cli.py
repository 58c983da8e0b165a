"""Command line: ``python run.py --experiment_name NAME [--loss multi_similarity] [overrides ...]``."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from . import config as C
from . import registry

EPILOG = """\
config overrides (any key of the merged config, after the flags above):
  --section.key VALUE          set a key; VALUE is YAML ('0.5', 'true', '[a, b]', '{name: contrastive}');
                               a mapping VALUE is merged into the existing mapping
  --section.key~replace VALUE  replace the key's value instead of merging (~OVERRIDE~ is the same flag)
  --section.key~delete         delete the key (~DELETE~ is the same flag)
  overrides apply last, over every method's overlay (config_methods/METHOD.yaml): --loss_wrapper.options.lam 0.3
                               sets XML's lambda; a key inside a section a method leaves empty applies to the
                               methods that have it
  --method_overrides.METHOD.section.key VALUE
                               set a key for one method only
  unknown keys are errors (with close matches); a rerun with another configuration stops (use --restart)
  examples: --trainer.batch_size 64   --loss.options '{margin: 0.2}'   --miner '{name: multi_similarity}'
search markers (in YAML or on the command line) make a key searched by Optuna:
  --loss_wrapper.options.lam '{search: float, low: 0.01, high: 10, log: true}'

coming from powerful-benchmarker (README, 'Coming from powerful-benchmarker'):
  --config_general [default, smoke]   the list form of every --config_<category> (or names without brackets)
  --bayes_opt_iters N                 the same as --n_trials N; --root_experiment_folder is --experiment_folder
  --from_pb PB_CONFIG_ROOT [--config_<category> NAMES ...] [--from_pb_out FOLDER]
                                      translate a powerful-benchmarker config folder into this project's config
                                      files, list what has no equivalent, print the command that runs it here

examples:
  python run.py --experiment_name xml_ms --loss multi_similarity
  python run.py --experiment_name smoke --loss multi_similarity --config_general smoke
  python run.py --experiment_name xml_kanji --config_dataset kanji --methods baseline xml gsp
  python run.py --experiment_name xml_once --loss multi_similarity --search none
  python run.py --compare experiments/xml_ms experiments/xml_contrastive
  python run.py --list
  python run.py --evaluate experiments/xml_ms --export
  python run.py --reproduce_results downloaded/xml_ms            # rerun it here, check its numbers
  python run.py --experiment_name mine --dataset csv --dataset_root my_data.csv --import my_losses.py --loss my_loss
"""

SHORTHANDS = {
    "dataset": "dataset.name",
    "dataset_root": "dataset.root",
    "loss": "loss.name",
    "trunk": "trunk.name",
    "pooling": "pooling.name",
    "device": "general.device",
    "n_trials": "general.n_trials",
    "reproductions": "general.reproductions",
    "storage": "general.storage",
    "seed": "general.seed",
    "search": "search.mode",
    "reference": "general.reference",
    "experiment_folder": "general.experiment_folder",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Fair-comparison benchmark of XML (cross-batch metric learning), GSP, XBN/AXBN and PML baselines: "
                    "per method an Optuna search over the marked config keys (validation MAP@R over 4 class-disjoint "
                    "folds), reproductions of the best configuration, and a comparison table with 95% intervals.")
    p.add_argument("--experiment_name", help="the experiment folder's name; rerunning the same name resumes it")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   help="methods to compare (default from config: baseline xml); see --list")
    for name in C.CATEGORIES:
        p.add_argument(f"--{name}", nargs="+", metavar="NAME", default=None,
                       help=f"YAML files of benchmark_configs/{name}/ merged in order over its default.yaml "
                            f"(names, [a, b] as in powerful-benchmarker, or paths of .yaml files)")
    p.add_argument("--dataset", help="data set: cards (default), kanji, cub200, cars196, sop, inshop")
    p.add_argument("--dataset_root", help="folder holding a real data set in its original format")
    p.add_argument("--loss", help="PML loss name, e.g. multi_similarity, contrastive, triplet_margin, proxy_anchor")
    p.add_argument("--trunk", help="mobilenet_v2 (default), efficientnet_lite0, resnet50, bninception")
    p.add_argument("--pooling", help="pooling of the baseline: gap (default), gmp; methods set their own")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--n_trials", "--bayes_opt_iters", dest="n_trials", type=int,
                   help="Optuna trials per searched method (the same budget for all); --bayes_opt_iters is "
                        "powerful-benchmarker's name for it")
    p.add_argument("--reproductions", type=int, help="trainings of the best configuration that are tested")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite in the experiment folder; "
                                     "postgresql://user:pw@host/db for several workers)")
    p.add_argument("--seed", type=int, help="the one seed: search trials train with it, reproduction r with "
                                            "seed + 1000 (r + 1), and it seeds the TPE sampler (general.seed)")
    p.add_argument("--search", choices=("auto", "none", "all"),
                   help="auto (default): every method searches the loss's hyperparameters (and its own) with the same "
                        "budget; none: every method runs once at its defaults; all: each method searches what it marks")
    p.add_argument("--reference", metavar="METHOD",
                   help="the method every other is compared with, paired by seed (default: the first method)")
    p.add_argument("--restart", action="store_true",
                   help="start an experiment whose folder holds another configuration over; the old folder (and its "
                        "studies) is kept as a backup <name>.backup-<time>")
    p.add_argument("--experiment_folder", "--root_experiment_folder", dest="experiment_folder",
                   help="parent folder of experiments (default: experiments; --root_experiment_folder is "
                        "powerful-benchmarker's name for it)")
    p.add_argument("--compare", nargs="+", metavar="EXP", help="make one table from several finished experiment folders")
    p.add_argument("--compare_names", nargs="+", metavar="NAME",
                   help="row names for --compare, one per folder (default: each experiment's loss)")
    p.add_argument("--latex", action="store_true", help="with --compare: print the LaTeX table too")
    p.add_argument("--list", action="store_true", help="list registered components and methods, then exit")
    p.add_argument("--print_config", action="store_true",
                   help="print the merged config and exit, after every check a real run makes (nothing is written)")
    p.add_argument("--from_pb", metavar="PB_CONFIG_ROOT",
                   help="translate a powerful-benchmarker config folder (the names of --config_<category>, default "
                        "'default') into this project's config files, list the keys with no equivalent, print the "
                        "command that runs it here")
    p.add_argument("--from_pb_out", metavar="FOLDER",
                   help="with --from_pb: the new folder of the translated files (default: PB_CONFIG_ROOT's name + "
                        "_from_pb, in the working folder)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("--evaluate", metavar="EXP", help="test the saved models of a finished experiment folder again "
                                                     "(every method, reproduction and fold), without training")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="with --evaluate: the test set (default) or each fold's validation classes")
    p.add_argument("--export", action="store_true", help="with --evaluate: write the embeddings with labels and image "
                                                         "paths to EXP/export/SPLIT/ (see docs/export.md)")
    p.add_argument("--reproduce_results", metavar="EXP",
                   help="run a finished experiment folder (e.g. downloaded) again from its recorded configuration, as "
                        "--experiment_name (default EXP's name + .reproduced-<time>), then check every test number "
                        "against the stored one (NEW/reproduction_check.md)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import a module (a name importable from the working folder, or a .py file) whose "
                        "xml_plugin.register(...) calls add your components; repeatable")
    return p


def parse(argv: Optional[List[str]] = None):
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        overrides = C.parse_overrides(rest)
    except C.ConfigError as exc:
        parser.error(str(exc))
    for flag, path in SHORTHANDS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if path.endswith(".name") and isinstance(value, str) and value.lstrip().startswith("{"):
            spec = C.parse_value(value)  # --loss '{name: contrastive, options: {...}}': the whole section
            if isinstance(spec, dict):
                overrides.insert(0, (path[: -len(".name")], spec))
                continue
        overrides.insert(0, (path, value))
    if args.methods:
        overrides.insert(0, ("general.methods", list(args.methods)))
    try:
        selection = {c: C.config_names(getattr(args, c)) for c in C.CATEGORIES if getattr(args, c)}
    except C.ConfigError as exc:
        parser.error(str(exc))
    return parser, args, selection, overrides


def forwarded(argv: List[str]) -> List[str]:
    """The command-line words that ``--from_pb``'s printed command keeps: all but ``--from_pb``, ``--from_pb_out`` and
    the ``--config_<category>`` names (they named powerful-benchmarker files)."""
    out, skip = [], False
    for i, word in enumerate(argv):
        if word.startswith("--") and len(word) > 2:
            flag = word.split("=", 1)[0]
            skip = flag in ("--from_pb", "--from_pb_out") or flag[2:] in C.CATEGORIES
            if skip and "=" in word:
                skip = False
                continue
        if not skip:
            out.append(word)
    return out


INPUT_ERRORS = (C.ConfigError, registry.UnknownComponentError, FileNotFoundError)


def main(argv: Optional[List[str]] = None) -> int:
    """Exit codes: 0 done, 2 bad input (one message on stderr, no traceback), 130 interrupted; a bug in our code or
    in a user's component raises (Python prints the traceback and exits with 1)."""
    parser, args, selection, overrides = parse(argv)
    if (args.export or args.split != "test") and not args.evaluate:
        parser.error("--export and --split go with --evaluate EXPERIMENT_FOLDER")
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    try:
        import importlib.util
        if importlib.util.find_spec("faiss") is None:
            raise C.ConfigError("faiss is not installed: pip install 'xml-plugin[cpu]' (or 'xml-plugin[gpu]' on a CUDA "
                                "machine; never both, they ship the same faiss package)")
        import optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if args.imports:
            from .user_modules import import_modules
            import_modules(args.imports)
        if args.list:
            for kind, names in registry.describe().items():
                print(f"{kind} ({len(names)}): {', '.join(names)}")
            return 0
        if args.evaluate:
            from .protocol.evaluate_saved import EXPORT, evaluate_experiment, summary
            results = evaluate_experiment(args.evaluate, split=args.split, export=args.export,
                                          progress=not args.no_progress)
            print(summary(results, args.split))
            print(f"metrics: {args.evaluate}/evaluate_{args.split}.csv"
                  + (f"; embeddings: {args.evaluate}/{EXPORT}/{args.split}/" if args.export else ""), file=sys.stderr)
            return 0
        if args.reproduce_results:
            from .protocol.reproduce_results import reproduce_results
            if selection:
                parser.error("--reproduce_results reruns the recorded config.yaml: leave out --config_<category>")
            md, check = reproduce_results(args.reproduce_results, args.experiment_name, overrides,
                                          progress=not args.no_progress)
            if md:  # a torchrun rank other than 0 prints nothing
                print(md)
                print(f"check: {check}; report: {check.parent / 'report.md'}", file=sys.stderr)
            return 0
        if args.compare:
            from .protocol.names import check_names
            from .protocol.report import compare
            check_names(args.compare_names or [], "--compare_names")
            md, tex = compare(args.compare, names=args.compare_names)
            print(md)
            if args.latex:
                print(tex)
            return 0
        if args.from_pb:
            from .pb_compat import from_pb
            text, cmd = from_pb(args.from_pb, selection, args.from_pb_out,
                                forwarded(list(sys.argv[1:] if argv is None else argv)))
            print(text)
            print(f"run it here with:\n  {cmd}")
            return 0
        presets = C.presets_for(selection, overrides)
        from .protocol.experiment import Experiment
        if args.print_config:
            import yaml
            # every check a real run makes (keys, numbers, names, each method's components), nothing written
            Experiment(C.load(selection, presets=presets), args.experiment_name or "print_config", progress=False,
                       overrides=overrides)
            print(yaml.safe_dump(C.load(selection, overrides, presets=presets), sort_keys=False))
            return 0
        if args.experiment_name is None:
            parser.error("--experiment_name is required (or --compare / --list / --print_config / --from_pb)")
        exp = Experiment(C.load(selection, presets=presets), args.experiment_name, progress=not args.no_progress,
                         overrides=overrides)
        if args.restart and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone moves the folder
            backup = exp.restart()
            if backup:
                print(f"restart: the old experiment is kept as {backup}", file=sys.stderr)
        if os.environ.get("RANK", "0") == "0":
            from .engine.train import faiss_index
            import faiss
            print(f"evaluation: faiss {getattr(faiss, '__version__', '?')}, {faiss_index()}", file=sys.stderr)
        md = exp.run()
        if not md:  # a torchrun rank other than 0: rank 0 prints the report
            return 0
        print(md)
        print(f"report: {exp.folder / 'report.md'} (also report.csv, report.tex, reproductions.csv and plots)",
              file=sys.stderr)
        return 0
    except INPUT_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
