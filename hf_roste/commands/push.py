"""`hf-roste push`: upload a saved RoSTE model folder to the Hub with the RoSTE model card.

    hf-roste push out/my-model me/my-model-roste-w4a4kv4 --private --base-model Qwen/Qwen2.5-0.5B

The folder (written by `save_pretrained` / `trainer.save_model()`) is copied to a temporary folder,
README.md and the per-layer rotation error plot are generated, and everything is uploaded in one
commit. The token comes from `--token`, `HF_TOKEN` or `hf auth login`; it is never printed.
"""

from __future__ import annotations

import argparse
import os

from ._common import fail


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "push", help="Upload a saved RoSTE model folder to the Hugging Face Hub with a model card.",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="DIR", help="A folder saved by hf_roste (save_pretrained / trainer.save_model), "
                   "or an `hf-roste export` output (compressed-tensors folder or .gguf file, pushed with its own card).")
    p.add_argument("repo_id", metavar="REPO_ID", help="Target repository, namespace/name.")
    p.add_argument("--private", action="store_true", help="Create the repository private.")
    p.add_argument("--token", default=None, help="Write token (default: HF_TOKEN or the `hf auth login` token).")
    p.add_argument("--commit-message", default="Upload RoSTE quantized model", help="Commit message.")
    p.add_argument("--revision", default=None, help="Branch to push to (default: main).")
    p.add_argument("--base-model", default=None, help="Hub id of the full-precision base model (card metadata).")
    p.add_argument("--dataset", dest="datasets", action="append", default=None,
                   help="Training dataset Hub id (card metadata); repeat for several.")
    p.add_argument("--eval-results", default=None, metavar="FILE",
                   help="The report of `hf-roste eval --output FILE` (or a JSON {metric: value}): the card's evaluation "
                        "table and the Hub's model-index (evaluation results).")
    p.add_argument("--license", default=None, help="License identifier for the card metadata.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export.hub import HubPushError, push_roste_model

    exported = args.model.endswith(".gguf") and os.path.isfile(args.model) or os.path.isfile(
        os.path.join(args.model, "roste_export.json"))
    if exported:  # an `hf-roste export` output: uploaded with its own card (target, engine command line)
        from ..export.export_card import push_export
        from ..export.hub import HubPushError

        try:
            info = push_export(args.model, args.repo_id, token=args.token, private=True if args.private else None,
                               commit_message=args.commit_message, revision=args.revision,
                               base_model=args.base_model, license=args.license)
        except (HubPushError, ValueError) as exc:
            return fail("push", str(exc))
        print(f"pushed {args.model} to {getattr(info, 'commit_url', None) or args.repo_id}")
        return 0
    if not os.path.isdir(args.model):
        return fail("push", f"DIR {args.model!r} is not a folder: pass the folder written by save_pretrained, an "
                            "`hf-roste export` folder or a .gguf file.")
    from ..export.model_card import read_eval_results

    eval_results, eval_dataset = None, None
    if args.eval_results:
        try:  # {metric: value}, or the report `hf-roste eval --output` writes (its dataset goes to model-index)
            eval_results, eval_dataset = read_eval_results(args.eval_results)
        except ValueError as exc:
            return fail("push", f"--eval-results {exc}")
    try:
        info = push_roste_model(args.model, args.repo_id, token=args.token, private=True if args.private else None,
                                commit_message=args.commit_message, revision=args.revision,
                                base_model=args.base_model, datasets=args.datasets, eval_results=eval_results,
                                eval_dataset=eval_dataset, license=args.license)
    except (HubPushError, ValueError) as exc:
        return fail("push", str(exc))
    url = getattr(info, "commit_url", None) or getattr(info, "repo_url", None) or args.repo_id
    print(f"pushed {args.model} to {url}")
    return 0
