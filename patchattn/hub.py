"""`patchattn.push_to_hub` and `patchattn push`: upload a patched model to the Hub in one commit.

A full upload is what ``save_pretrained`` writes (safetensors shards, config.json carrying the patch spec,
generation config) plus the tokenizer and a model card rendered from ``model_cards/template.md``. A delta upload
holds only the tensors the variant added or training changed; its config.json names the base model and the base
commit the delta was computed against. ``patchattn.from_pretrained`` loads both kinds.

Everything is staged in a temporary directory and sent as a single commit: a repo is never half-updated, and a
failed push leaves nothing behind locally, so the remedy for any failure is to run the same push again.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import tempfile
from pathlib import Path

import huggingface_hub
import torch
import transformers
import yaml
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, EvalResult, HfApi, ModelCard, ModelCardData
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from ._version import __version__
from .loading import DELTA_FILE, hub_error_hints
from .patching import base_model_type, is_patched, resolve_family, unpatched_config
from .variants import get_variant

# Files a push owns: a remote one the new upload does not rewrite (old shards, a delta) would be stale, so it goes.
_OWNED = ("*.safetensors", "*.safetensors.index.json")


def push_to_hub(model, repo_id: str, *, tokenizer=None, eval_results=None, recipe_config=None, delta_only=False,
                base_model: str | None = None, base_revision: str | None = None, private: bool = False,
                commit_message: str | None = None, max_shard_size: int | str = "2GB", revision: str | None = None,
                token: str | None = None, license: str | None = None) -> huggingface_hub.CommitInfo:
    """Upload a patched model to ``repo_id`` (created if missing) in one commit and return the commit info.

    ``delta_only`` uploads just the variant's weights and the tensors that differ from ``base_model`` at
    ``base_revision`` (pinned to its commit sha); ``base_model`` defaults to the Hub repo the model was loaded from.
    ``eval_results`` (a dict or a list of dicts, one per table row) and ``recipe_config`` (a dict or YAML text) go
    into the model card (also as machine-readable ``model-index``). ``license`` defaults to the base model's.
    ``revision`` pushes to that branch, creating it from main if needed.
    """
    if getattr(model, "peft_config", None):
        raise ValueError("the model carries PEFT adapters: merge them first (model = model.merge_and_unload()), so "
                         "the upload loads without peft; a delta upload then holds the merged weights")
    if not is_patched(model):
        raise ValueError("the model is not patched: call patchattn.patch_model first (model.push_to_hub uploads an "
                         "unpatched model)")
    base_model = base_model or _loaded_from(model, repo_id)
    if delta_only and base_model is None:
        raise ValueError("delta_only=True needs base_model=<Hub repo id>: the repo whose weights the delta is "
                         "computed against and that loading will fetch")
    api = HfApi(token=token)  # built per push, so it talks to the endpoint configured now (HF_ENDPOINT)
    with tempfile.TemporaryDirectory(prefix="patchattn-push-") as staging:
        delta = None
        if delta_only:
            with hub_error_hints(base_model, base_revision, "base model"):
                base_revision = api.model_info(base_model, revision=base_revision).sha
                delta = _save_delta(model, staging, base_model, base_revision, token)
        else:
            model.save_pretrained(staging, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        card = model_card(model, repo_id, base_model=base_model, delta=delta, eval_results=eval_results,
                          recipe_config=recipe_config, tokenizer_repo=repo_id if tokenizer is not None else base_model,
                          license=license)
        card.save(os.path.join(staging, "README.md"))
        specs = model.config.patchattn
        message = commit_message or (f"patchattn: {'delta of ' if delta else ''}{specs[0]['family']} model with "
                                     f"{' + '.join(s['variant'] for s in specs)} attention")
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            head = api.model_info(repo_id, revision=revision)
            return api.create_commit(repo_id, _operations(head, staging), revision=revision, commit_message=message,
                                     parent_commit=head.sha)  # a concurrent push fails instead of interleaving
        except Exception as e:
            e.add_note(f"patchattn: the push to {repo_id} did not complete. It is a single commit, so no partial "
                       "upload reached the repo, and the staged files are removed: fix the cause above and run the "
                       "same push again.")
            raise


def _loaded_from(model, repo_id: str) -> str | None:
    """The Hub repo the model was loaded from, if that is what ``name_or_path`` holds."""
    name = getattr(model.config, "_name_or_path", "") or ""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not os.path.exists(name) and name != repo_id:
        return name
    return None


def _operations(head: huggingface_hub.ModelInfo, staging: str) -> list:
    """Add every staged file; delete the files of ``head`` that a push owns and this one does not rewrite."""
    staged = sorted(p.relative_to(staging).as_posix() for p in Path(staging).rglob("*") if p.is_file())
    stale = [s.rfilename for s in head.siblings or []
             if s.rfilename not in staged and any(fnmatch.fnmatch(s.rfilename, pattern) for pattern in _OWNED)]
    return ([CommitOperationDelete(path_in_repo=f) for f in stale]
            + [CommitOperationAdd(path_in_repo=f, path_or_fileobj=os.path.join(staging, f)) for f in staged])


def _save_delta(model, staging: str, base_model: str, base_revision: str, token) -> dict:
    """Write the tensors loading must put on top of the patched base, and a config.json that points at the base.

    The base is loaded exactly as ``from_pretrained`` will load it (same loader, config and dtype), so whatever
    differs — training, merged LoRA, the variant's own weights, which the base lacks — is in the delta.
    """
    specs = model.config.patchattn
    base = AutoModelForCausalLM.from_pretrained(base_model, revision=base_revision,
                                                config=unpatched_config(model.config), dtype=model.dtype, token=token)
    base_state = base.state_dict()
    tensors, seen = {}, set()
    for key, value in model.state_dict().items():
        storage = value.data_ptr()
        if storage in seen:  # tied weights (lm_head = embed_tokens) are stored once
            continue
        value = value.detach().cpu()
        if key not in base_state or not torch.equal(value, base_state[key]):
            seen.add(storage)
            tensors[key] = value.contiguous()
    del base, base_state
    save_file(tensors, os.path.join(staging, DELTA_FILE), metadata={"format": "pt"})
    delta = {"base_model": base_model, "base_revision": base_revision, "file": DELTA_FILE}
    config = copy.deepcopy(model.config)
    config.patchattn = [{**specs[0], "delta": delta}] + list(specs[1:])  # the record goes on the first spec
    config.save_pretrained(staging)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(staging)
    return {**delta, "tensors": len(tensors)}


def template_path() -> Path:
    """The card template: installed as package data ``patchattn/model_cards/`` (see pyproject.toml), and at the
    root of a source checkout (editable installs)."""
    package = Path(__file__).resolve().parent
    installed = package / "model_cards" / "template.md"
    return installed if installed.is_file() else package.parent / "model_cards" / "template.md"


def model_card(model, repo_id: str, *, base_model=None, delta=None, eval_results=None, recipe_config=None,
               tokenizer_repo=None, license: str | None = None) -> ModelCard:
    """The README of a push: Hub metadata (base model and relation, library, tags, pipeline) and the sections of
    the template (patch, loading snippet, evaluation, recipe, versions)."""
    specs = model.config.patchattn
    variants = [get_variant(spec["variant"]) for spec in specs]
    names = [spec["variant"] for spec in specs]
    family = specs[0]["family"]
    if len(specs) == 1:
        layers, params = specs[0]["layers"], specs[0]["params"]
    else:  # a composition: every patched layer, and each variant's parameters under its name
        layers = sorted({i for spec in specs for i in spec["layers"]})
        params = {f"{spec['variant']}.layers": spec["layers"] for spec in specs}
        params.update({f"{spec['variant']}.{k}": v for spec in specs for k, v in spec["params"].items()})
    relation = {"base_model_relation": "adapter" if delta else "finetune"} if base_model else {}
    license_ = license or _base_license(base_model)
    data = ModelCardData(base_model=base_model, library_name="patchattn", pipeline_tag="text-generation",
                         tags=["patchattn", *names, family], license=license_,
                         model_name=repo_id, eval_results=_model_index(eval_results) or None, **relation)
    columns, rows = _eval_table(eval_results)
    recipe = (yaml.safe_dump(recipe_config, sort_keys=False) if isinstance(recipe_config, dict)
              else recipe_config or "").strip()
    versions = {"patchattn": __version__, "transformers": transformers.__version__, "torch": torch.__version__,
                "huggingface_hub": huggingface_hub.__version__}
    return ModelCard.from_template(
        data, template_path=str(template_path()), repo_id=repo_id, variant=" + ".join(names),
        variant_description=" ".join(v.description for v in variants),
        variant_kind="trainable" if any(v.trainable for v in variants) else "training-free",
        family=family, family_model_type=base_model_type(model.config.model_type), layers=layers,
        num_layers=len(resolve_family(model).attention_modules(model)),
        params=params, delta=delta is not None, delta_tensors=(delta or {}).get("tensors"),
        delta_file=DELTA_FILE, base_revision=(delta or {}).get("base_revision"), tokenizer_repo=tokenizer_repo,
        eval_columns=columns, eval_rows=rows, recipe=recipe, versions=versions)


def _base_license(base_model: str | None) -> str | None:
    """The licence in the base model's card: a derived model is under the base model's terms."""
    if base_model is None:
        return None
    try:
        return ModelCard.load(base_model).data.license
    except Exception:  # noqa: BLE001 -- no card, no access: the card then names no licence (pass license= to set one)
        return None


def _model_index(results) -> list[EvalResult]:
    """Eval rows as the Hub's machine-readable ``model-index``: each float field is a metric; the other scalar
    fields describe the setting (dataset config), ``task``/``dataset`` name the dataset."""
    entries = []
    for row in [results] if isinstance(results, dict) else list(results or []):
        dataset = str(row.get("dataset") or row.get("task") or "custom")
        setting = ", ".join(f"{k}={v}" for k, v in row.items()
                            if k not in ("dataset", "task") and isinstance(v, (str, int, bool)))
        for name, value in row.items():
            if isinstance(value, float):
                entries.append(EvalResult(task_type="text-generation", dataset_type=dataset, dataset_name=dataset,
                                          dataset_config=setting or None, metric_type=name, metric_value=value))
    return entries


def _eval_table(results) -> tuple[list[str], list[list[str]]]:
    """Columns (scalar fields, in first-seen order) and formatted rows; nested values are left out."""
    if not results:
        return [], []
    rows = [results] if isinstance(results, dict) else list(results)
    scalar = (str, int, float, bool, type(None))
    columns = list(dict.fromkeys(k for row in rows for k, v in row.items() if isinstance(v, scalar)))

    def cell(value) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)
        return text.replace("|", "\\|")

    return columns, [[cell(row.get(c)) for c in columns] for row in rows]


def add_cli(subparsers) -> None:
    """Register ``patchattn push DIR REPO_ID`` on the ``patchattn`` command line."""
    p = subparsers.add_parser("push", help="upload a patched model directory to the Hub (one commit, with a card)")
    p.add_argument("directory", help="a patched checkpoint, e.g. written by `patchattn convert`")
    p.add_argument("repo_id")
    p.add_argument("--delta-only", action="store_true", help="upload only what differs from --base-model")
    p.add_argument("--base-model", help="Hub repo the weights came from (default: recorded in the checkpoint)")
    p.add_argument("--base-revision", help="branch, tag or commit of the base model (default: main, pinned)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--eval-json", help="JSON file with eval results (an object or a list of rows) for the card")
    p.add_argument("--recipe", help="YAML file of the training recipe, shown in the card")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--revision", help="branch to push to (created from main if missing)")
    p.add_argument("--commit-message")
    p.set_defaults(fn=_cmd_push)


def _cmd_push(args) -> None:
    from transformers import AutoTokenizer

    from .loading import from_pretrained

    model = from_pretrained(args.directory)
    has_tokenizer = os.path.isfile(os.path.join(args.directory, "tokenizer_config.json"))
    eval_results = json.loads(Path(args.eval_json).read_text()) if args.eval_json else None
    info = push_to_hub(
        model, args.repo_id, tokenizer=AutoTokenizer.from_pretrained(args.directory) if has_tokenizer else None,
        eval_results=eval_results, recipe_config=Path(args.recipe).read_text() if args.recipe else None,
        delta_only=args.delta_only, base_model=args.base_model, base_revision=args.base_revision,
        private=args.private, commit_message=args.commit_message, max_shard_size=args.max_shard_size,
        revision=args.revision)
    print(f"pushed {args.repo_id}: {info.commit_url}")
