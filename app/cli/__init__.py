"""The headless runner: `loomwork run|batch|validate|nodes|models|convert|oracle`.

Every user mistake (a bad file, an unknown node, a bad --set value, a missing model) is one
clear message and a non-zero exit; tracebacks only with --debug.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from .headless import (  # noqa: F401
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    _load,
    _problems,
    apply_sets,
    model_roots,
    new_executor,
    run_headless,
    runnable_problems,
    set_threads,
)


class ProgressPrinter:
    """A one-line progress bar on a terminal; plain lines otherwise (logs, CI)."""

    def __init__(self, graph, stream=None):
        # sys.stderr looked up now, not at import: it may have been redirected since.
        self.graph, self.stream = graph, stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self._last = 0.0

    def node_state(self, nid, state, info):
        if state in ("queued",):
            return
        node = self.graph.nodes[nid]
        label = node.title or node.type
        if state == "running":
            return
        extra = f" ({info['seconds']:.2f}s)" if "seconds" in info else ""
        err = f": {info['error']}" if info.get("error") else ""
        self._line(f"{label:<24} {state}{extra}{err}")

    def progress(self, nid, step, total):
        node = self.graph.nodes[nid]
        if self.tty:
            width = 30
            filled = int(width * step / max(total, 1))
            self.stream.write(f"\r{(node.title or node.type):<24} [{'#' * filled}{'.' * (width - filled)}] "
                              f"{step}/{total}")
            self.stream.flush()
            if step == total:
                self.stream.write("\r" + " " * 70 + "\r")
        elif step == total or time.monotonic() - self._last > 2:
            self._last = time.monotonic()
            self._line(f"{(node.title or node.type):<24} step {step}/{total}")

    def _line(self, text):
        self.stream.write(text + "\n")
        self.stream.flush()


def cmd_run(args) -> int:
    from app.engine import EngineEvents

    graph = _load(args.graph)
    apply_sets(graph, args.set or [])
    problems = runnable_problems(graph, args.graph)
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return EXIT_USAGE
    set_threads()
    printer = ProgressPrinter(graph)
    events = EngineEvents(node_state=printer.node_state, progress=printer.progress)
    out = Path(args.out or ".")
    executor = new_executor(disk_cache=not args.no_disk_cache, model_roots=model_roots(args),
                            write_dirs=args.allow_write or [])
    report = run_headless(executor, graph, args.graph, out, events)
    if args.report:
        Path(args.report).write_text(json.dumps(report.as_json(), indent=2))
    for rep in report.nodes.values():
        if rep.status == "failed":
            print(f"error: {rep.title} [{rep.node_id[:8]}] failed: {rep.error}", file=sys.stderr)
            if args.debug and rep.traceback:
                print(rep.traceback, file=sys.stderr)
    for path in report.outputs():
        print(f"saved {path}")
    print(f"{'done' if report.ok else 'finished with errors'} in {report.seconds:.2f}s", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_validate(args) -> int:
    graph = _load(args.graph)
    apply_sets(graph, args.set or [])
    from app.graph import validate
    from nodes import registry

    problems = validate(graph, registry.get)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if not problems:
        print(f"{args.graph}: ok ({len(graph.nodes)} nodes, {len(graph.edges)} wires)")
    return EXIT_USAGE if problems else EXIT_OK


def cmd_nodes(args) -> int:
    from nodes import registry

    types = registry.all_types()
    if args.json:
        print(json.dumps([cls.describe() for cls in types.values()], indent=2))
        return EXIT_OK
    for name, cls in types.items():
        d = cls.describe()
        ins = ", ".join(f"{n}: {i['type']}{'?' if i['optional'] else ''}" for n, i in d["inputs"].items())
        outs = ", ".join(f"{n}: {t}" for n, t in d["outputs"].items())
        print(f"{name}  [{cls.category}]  ({ins}) -> ({outs})")
        for pname, p in d["params"].items():
            rng = ""
            if p.get("min") is not None or p.get("max") is not None:
                rng = f" {p.get('min')}..{p.get('max')}"
            if p.get("options"):
                rng = " " + "|".join(p["options"])
            print(f"    {pname}: {p['kind']}{rng} = {p['default']!r}")
    return EXIT_OK


def cmd_models(args) -> int:
    from kernels.model_folders import ENV_VAR, scan

    roots = model_roots(args)
    if not roots:
        raise UsageError(f"no model folders: pass --models DIR or set {ENV_VAR}")
    missing = [r for r in roots if not os.path.isdir(r)]
    if missing:
        raise UsageError(f"not a folder: {', '.join(missing)}")
    entries = scan(roots)
    if args.json:
        print(json.dumps([e.as_dict() for e in entries], indent=2))
        return EXIT_OK
    if not entries:
        print(f"no models found in {', '.join(roots)}", file=sys.stderr)
        return EXIT_OK
    width = max(len(e.name) for e in entries)
    print(f"{'KIND':<16} {'FAMILY':<10} {'NAME':<{width}}  PATH")
    for e in entries:
        note = f"  ({e.note})" if e.note else ""
        print(f"{e.kind:<16} {e.family:<10} {e.name:<{width}}  {e.path}{note}")
    return EXIT_OK


CONVERT_TARGETS = ("single-file", "diffusers")


def cmd_convert(args) -> int:
    """A diffusers folder to an original-layout single file, or a single file to a folder."""
    import torch

    from kernels.convert import ConvertError
    from kernels.convert_files import folder_to_single_file, single_file_to_folder
    from kernels.models import ModelLoadError

    src = os.path.expanduser(args.src)
    out = os.path.expanduser(args.out)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        if args.to == "single-file":
            if not os.path.isdir(src):
                raise UsageError(f"{src}: --to single-file converts a diffusers model folder")
            if not out.lower().endswith(".safetensors"):
                raise UsageError(f"{out}: the single file should end in .safetensors")
            written = folder_to_single_file(src, out, family=args.family, dtype=dtype)
        else:
            if not os.path.isfile(src):
                raise UsageError(f"{src}: --to diffusers converts a .safetensors checkpoint file")
            written = single_file_to_folder(src, out, config=args.config, dtype=dtype)
    except (ModelLoadError, ConvertError) as exc:
        raise UsageError(str(exc)) from None
    print(written)
    return EXIT_OK


def cmd_oracle(args) -> int:
    try:
        from kernels.shapes.oracle import detect_in_files
    except ImportError as exc:
        raise UsageError(f"the shapes oracle is not available: {exc}") from None
    results = detect_in_files(args.images)
    print(json.dumps(results, indent=2))
    return EXIT_FAILED if any("error" in r for r in results) else EXIT_OK


MODELS_HELP = ("a model folder: a ComfyUI or A1111 install, its models folder, or a folder of models; "
               "LoadModel's ckpt:NAME is looked up there, then in LOOMWORK_MODELS (repeatable)")


# The verbs, for app.main to tell a command from a graph path (it must not start Qt for one).
COMMANDS = ("run", "batch", "validate", "nodes", "models", "convert", "oracle")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loomwork", description="Loomwork: node graphs for diffusion. "
                                     "With no command (or a .loom/.png file) the desktop app opens.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="render a graph headless")
    run.add_argument("graph")
    run.add_argument("--set", action="append", metavar="NODE.PARAM=VALUE",
                     help="override a param; NODE is an id or a unique title (repeatable)")
    run.add_argument("--out", metavar="DIR", help="where SaveImage nodes write (default: here)")
    run.add_argument("--report", metavar="FILE", help="write a JSON report of every node")
    run.add_argument("--allow-write", action="append", metavar="DIR",
                     help="a folder the graph may write in besides --out (repeatable)")
    run.add_argument("--no-disk-cache", action="store_true", help="do not read or write the disk cache")
    run.add_argument("--models", action="append", metavar="DIR", help=MODELS_HELP)
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)
    from app.batch.cli import add_parser as add_batch_parser  # torch- and Ray-free

    add_batch_parser(sub, MODELS_HELP)
    val = sub.add_parser("validate", help="check a graph without running it")
    val.add_argument("graph")
    val.add_argument("--set", action="append", metavar="NODE.PARAM=VALUE")
    val.set_defaults(func=cmd_validate)
    nodes = sub.add_parser("nodes", help="list node types with ports and params")
    nodes.add_argument("--json", action="store_true")
    nodes.set_defaults(func=cmd_nodes)
    models = sub.add_parser("models", help="list the models in the model folders")
    models.add_argument("--json", action="store_true", help="a JSON list of {name, kind, path, family, note}")
    models.add_argument("--models", action="append", metavar="DIR", help=MODELS_HELP)
    models.set_defaults(func=cmd_models)
    convert = sub.add_parser("convert", help="a diffusers folder to a single .safetensors file, or back")
    convert.add_argument("src", help="a diffusers model folder, or a .safetensors checkpoint")
    convert.add_argument("--to", required=True, choices=CONVERT_TARGETS, help="what to write")
    convert.add_argument("out", help="the .safetensors file (single-file) or the new folder (diffusers)")
    convert.add_argument("--family", choices=("sd1", "sd2", "sdxl", "sd3"),
                         help="single-file: the layout to write, when the folder does not say (SD 1 or 2)")
    convert.add_argument("--config", metavar="DIR", help="diffusers: a folder whose configs and tokenizers "
                         "replace the shipped ones (e.g. one holding T5's tokenizer)")
    convert.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                         help="convert the weights (default: keep them)")
    convert.set_defaults(func=cmd_convert)
    oracle = sub.add_parser("oracle", help="detect the objects in ShapesT2I images (JSON)")
    oracle.add_argument("images", nargs="+")
    oracle.set_defaults(func=cmd_oracle)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug of ours: still one line unless --debug
        if getattr(args, "debug", False):
            raise
        print(f"error: {type(exc).__name__}: {exc} (run with --debug for details)", file=sys.stderr)
        return EXIT_FAILED
