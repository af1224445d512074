"""Command line: the stages' functions without Snakemake, and checks of finished outputs.

    neuron-embeddings verify results/<run>/embeddings/layer-2.parquet   # the embedding invariant, from the file
    neuron-embeddings prepare-model gpt2 results/gpt2/model              # any source -> local safetensors folder
    neuron-embeddings estimate --configfile configs/gpt2-small.yaml       # jobs, tokens, disk, GPU-hours per stage
    neuron-embeddings export results/<run> --format delphi --out DIR        # other tools' formats (docs/exports.md)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from .errors import PipelineError
from .estimate import add_arguments as add_estimate_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neuron-embeddings", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="check sum(embedding) + bias == pre-activation in embeddings Parquet files")
    verify.add_argument("paths", nargs="+")
    prepare = sub.add_parser("prepare-model", help="save a model (hub id, folder, GGUF) as a local safetensors folder")
    prepare.add_argument("source")
    prepare.add_argument("out_dir")
    prepare.add_argument("--gguf-file")
    prepare.add_argument("--revision")
    prepare.add_argument("--trust-remote-code", action="store_true")
    add_estimate_arguments(sub.add_parser("estimate", help="before submitting: jobs, tokens, disk and GPU-hours per stage"))
    export = sub.add_parser("export", help="a finished run folder in delphi's, Neuronpedia's or DuckDB's format (docs/exports.md)")
    export.add_argument("run_dir", help="results/<run> (or results/<run>/models/<name>)")
    export.add_argument("--format", dest="formats", action="append", required=True, choices=["delphi", "neuronpedia", "duckdb"],
                        help="repeat for several")
    export.add_argument("--out", help="output folder (default <run_dir>/export)")
    export.add_argument("--layer", dest="layers", action="append", type=int, help="repeat for several (default: every finished layer)")
    export.add_argument("--corpus", help="folder of the corpus shards (default <run_dir>/corpus, or the run's for another model)")
    export.add_argument("--delphi-splits", type=int, help="safetensors shards per hookpoint (config export.delphi_splits)")
    for key in ("model", "source-set", "release", "creator", "creator-id"):
        export.add_argument(f"--neuronpedia-{key}", help=f"config export.neuronpedia_{key.replace('-', '_')}")
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            from .embeddings import verify_file

            for path in args.paths:
                print(f"{path}: invariant holds, worst relative error {verify_file(path):.2e}")
        elif args.command == "estimate":
            from .estimate import main as estimate_main

            return estimate_main(args)
        elif args.command == "export":
            from .export.run import export_run

            options = {key: value for key, value in vars(args).items()
                       if (key.startswith("neuronpedia_") or key == "delphi_splits") and value is not None}
            for report in export_run(args.run_dir, args.formats, args.out, options, args.layers, args.corpus):
                print(json.dumps(report, default=str))
        elif args.command == "prepare-model":
            from .models import ModelSource, prepare_model

            spec = ModelSource(args.source, args.gguf_file, args.revision, args.trust_remote_code)
            print(json.dumps(asdict(prepare_model(spec, args.out_dir)), indent=2))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
