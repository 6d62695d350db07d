"""`--target cpu`: ONNX Runtime on any CPU. Variants, each a complete artifact set `vlm-export run` takes:

    fp32/  the graphs with the decoder in --layout: inplace (default: one GroupQueryAttention per
           layer over a K/V buffer the runtime binds as past and present, rotary fused) or dynamic
           (Concat KV, the diff baseline); the exported graphs as they are when the build exported
           them in that layout (graphs_layouts), else with the decoder re-exported in it
    int8/  fp32's decoder MatMuls -> MatMulNBits 8-bit (blocks of 32 with a scale and a minimum)
    int4/  fp32's decoder MatMuls -> MatMulNBits 4-bit (llama.cpp's Q4_1: blocks of 32 with a scale and
           a minimum; lm_head 8-bit; a GGUF's own Q4_1/Q8_0 blocks carried over exactly)

On x86-64 CPUs with AVX-512 VNNI, int8/ and int4/ then run on vlm-export's own kernels (kernels/,
shipped in the variant as an ORT custom-op library): the same codes, scales and minimums repacked
for its int4/int8 matmul, and the decoder's attention on its GroupQueryAttention (the same contract,
each K/V row read once for the query heads that share it). --kernels ort keeps ONNX Runtime's
MatMulNBits and attention: the variant then runs on any ORT.

int8/ and int4/ also carry the vision tower in dynamic int8 (MatMul weights per-channel int8,
activations quantized per call; --vision fp32 keeps it float) and, in the inplace layout, an int8
KV cache (a scale per head and channel, calibrated on fp32's K/V; --kv fp32 keeps it float). Each
variant's accuracy against fp32 is measured end to end, and its vision output against fp32's, in
the build report.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from vlm_export.errors import VlmExportError
from vlm_export.kernels.native_graph import use_native_graph
from vlm_export.progress import stage, step
from vlm_export.quality.eval_set import eval_tokens_for, random_llm
from vlm_export.quality.scoring import record_reference
from vlm_export.quantize.dynamic_int8 import quantize_dynamic_int8
from vlm_export.quantize.kv_int8 import calibrate_kv_scales, quantize_kv_cache
from vlm_export.quantize.matmul_kernel import use_matmul_kernel
from vlm_export.quantize.weight_only import WeightOnlyConfig, quantize_weights, source_blocks
from vlm_export.runtime.image_encoder import Prefetch, cached_images
from vlm_export.spec.graph_io import GraphRole, KvUpdate
from vlm_export.spec.layouts import graph_layout, layout_of
from vlm_export.targets.assemble import assemble_variant, export_layout
from vlm_export.targets.build_loop import build_stages
from vlm_export.targets.cpu.profile import (
    KV_INT8,
    NATIVE_KERNELS,
    RECIPES,
    VISION_INT8,
    WEIGHT_ONLY,
    Profile,
)
from vlm_export.targets.recipe import Recipe, weight_lines

WEIGHT_BITS = {"int8": 8, "int4": 4}  # precision -> MatMulNBits bits (quantize/weight_only.py says why these formats)
KV_RECIPE = "int8 per-channel, calibration/ prefills, margin 1.2"  # in the build-cache key
BUILD_RECIPE = "blocks-v4: gguf carry-over (widened into int8), min/max int4 and int8, quality on eval prose"  # a format change rebuilds


def kernel_recipe() -> str:
    """The native kernel's sources, by hash: a kernel change rebuilds the variants that ship it."""
    from vlm_export.kernels.library import sources_digest

    return sources_digest()[:16]


def weight_config(name: str) -> WeightOnlyConfig | None:
    """The variant's MatMulNBits settings (quantize/weight_only.py says why these formats); a GGUF
    model's own blocks are carried over where they fit (`source_blocks`). None: a float variant."""
    bits = WEIGHT_BITS.get(RECIPES[name].precision)
    return WeightOnlyConfig(bits=bits) if bits else None


def int8_kv(profile: Profile, name: str) -> bool:
    """Whether the variant's KV cache may be int8: quantized variants of the inplace layout, unless
    --kv fp32 (with `auto` the build keeps it only where the budget holds)."""
    return KV_INT8 in RECIPES[name].passes_on(GraphRole.DECODER) and profile.kv in ("int8", "auto") \
        and layout_of(profile.layout).kv_update == KvUpdate.IN_PLACE  # the int8 cache is GroupQueryAttention's


def recipes_for(profile: Profile) -> list[Recipe]:
    """The declared recipes of `profile.variants` with the profile's choices applied: its decoder
    layout, and only the passes it keeps (--vision fp32 drops the vision pass, --kv fp32 the KV
    cache's, --kernels ort or a machine without the kernel's CPU features the native kernels')."""
    resolved = []
    for name in profile.variants:
        recipe = RECIPES[name]
        keep = {VISION_INT8: profile.vision == "int8", KV_INT8: int8_kv(profile, name),
                NATIVE_KERNELS: native_kernels(profile, name)}
        resolved.append(dataclasses.replace(recipe, layout=profile.layout,
                                            passes=tuple(p for p in recipe.passes if keep.get(p.name, True))))
    return resolved


def native_kernels(profile: Profile, name: str) -> bool:
    """Whether the quantized variant ships vlm-export's kernels (int4 matmuls, attention): `auto`
    takes them where they can be built and run (`preflight` has already refused `native` where they
    cannot). fp32 stays on ONNX Runtime's own ops: it is the plain-ORT baseline of the others."""
    from vlm_export.kernels.library import unavailable_reason

    if NATIVE_KERNELS not in RECIPES[name].passes_on(GraphRole.DECODER) or profile.kernels == "ort":
        return False
    return profile.kernels == "native" or unavailable_reason() is None


def _decoder_rewrite(config: WeightOnlyConfig, kv_scales, native: bool, model: dict):
    def rewrite(graph: dict, source: Path, out: Path) -> dict:
        from vlm_export.kernels.library import compile_library

        done = quantize_weights(source, out / graph["file"], config, source_blocks(model))
        if kv_scales is not None:
            done.update(quantize_kv_cache(out / graph["file"], kv_scales(), graph))
        if native:
            library = compile_library(out)
            done.update(use_matmul_kernel(out / graph["file"], graph, library))
            done.update(use_native_graph(out / graph["file"], graph, library))
            if "custom_op_library" not in graph:  # nothing took a kernel (an int8 KV cache keeps ORT's attention)
                library.unlink()
        return done
    return rewrite


class VisionInt8Once:
    """The vision tower's dynamic int8 copy and its accuracy against fp32, made once per build and
    hard-linked into every quantized variant (the same bytes: the quantizer reads only the fp32
    graph). Quantizing and measuring it again per variant repeated ~30 s on smol's 1.2 GB tower."""

    def __init__(self):
        self.path: Path | None = None  # the first variant's quantized vision graph
        self.done: dict = {}
        self.accuracy: dict | None = None

    def rewrite(self, graph: dict, source: Path, out: Path) -> dict:
        from vlm_export.artifacts import link_or_copy

        target = out / graph["file"]
        if self.path is not None and self.path.is_file():
            link_or_copy(self.path, target)
        else:  # the first quantized variant, or its folder was removed (a rejected attempt)
            self.done, self.path, self.accuracy = quantize_dynamic_int8(source, target), target, None
        return dict(self.done)

    def accuracy_vs_fp32(self, fp32: Path, variant: Path) -> dict:
        if self.accuracy is None:
            self.accuracy = vision_accuracy(fp32, variant)
        return self.accuracy


def _variant(graphs: Path, manifest: dict, staging: Path, recipe: Recipe, kv_scales, vision: VisionInt8Once) -> dict:
    """A recipe without passes from the exported graphs (`manifest`: theirs, verified; relaid out,
    or linked as they are); the others from their source stage (built and verified just before)."""
    from vlm_export.artifacts import read_manifest

    out = staging / recipe.name
    if recipe.source is None:
        decoder = next(g for g in manifest["graphs"] if g["wrapper"] == GraphRole.DECODER)
        if recipe.layout != graph_layout(decoder).name:  # relaid out; else the exported graphs as they are
            return export_layout(graphs, out, layout=recipe.layout)
        return assemble_variant(graphs, out, manifest, {}, target="cpu", variant=recipe.name, layout=recipe.layout)
    decoder = recipe.passes_on(GraphRole.DECODER)
    rewrites = {}
    if WEIGHT_ONLY in decoder:
        rewrites[GraphRole.DECODER] = _decoder_rewrite(weight_config(recipe.name), kv_scales if KV_INT8 in decoder else None,
                                                       NATIVE_KERNELS in decoder, manifest["model"])
    if VISION_INT8 in recipe.passes_on(GraphRole.VISION):
        rewrites[GraphRole.VISION] = vision.rewrite
    source = staging / recipe.source
    return assemble_variant(source, out, read_manifest(source), rewrites, target="cpu", variant=recipe.name,
                            layout=recipe.layout)


def vision_accuracy(fp32: Path, variant: Path) -> dict:
    """The variant's image embeddings vs fp32's on the held-out eval image (computed once per process:
    scoring has usually run this image through both vision graphs already)."""
    from vlm_export.diff.output_agreement import outputs_agreement
    from vlm_export.quality.eval_set import eval_image
    from vlm_export.runtime.image_encoder import cached_images, image_embeds

    image = eval_image()  # the image of the scoring's greedy and long prompts
    with cached_images():
        pair = {"image_embeds": image_embeds(fp32, image)}, {"image_embeds": image_embeds(variant, image)}
    return outputs_agreement([({}, *pair)])


def preflight(profile: Profile) -> None:
    """The int8 KV scales need the calibration set, `--kernels native` a machine that can build and
    run the kernel: both checked before any export or variant."""
    from vlm_export.kernels.library import unavailable_reason
    from vlm_export.quantize.calibration import check_calibration

    quantized = any(NATIVE_KERNELS in RECIPES[name].passes_on(GraphRole.DECODER) for name in profile.variants)
    reason = unavailable_reason() if profile.kernels == "native" and quantized else None
    if reason:
        raise VlmExportError(f"--kernels native: {reason}", "use --kernels ort (or auto)")
    if not any(int8_kv(profile, name) for name in profile.variants):
        return
    try:
        check_calibration(profile.calibration)
    except VlmExportError as exc:
        raise VlmExportError(f"the int8 KV cache needs calibration data: {exc.problem}",
                             "pass --calibration DIR (recipe.json, images/, prompts.txt), or --kv fp32") from exc


def graphs_layouts(profile: Profile) -> tuple[str, ...]:
    """The decoder layouts this target builds from (build.py's ensure_graphs): any, the profile's
    first (exported in it, fp32 links the graphs as they are; from another, fp32 re-exports the decoder)."""
    from vlm_export.spec.layouts import NAMES

    return (profile.layout, *(name for name in NAMES if name != profile.layout))


def build(graphs: Path, out: Path, profile: Profile, force: bool = False) -> dict:
    from vlm_export.artifacts import verify

    manifest = verify(graphs)
    preflight(profile)
    scales, screened, vision = {}, {}, VisionInt8Once()
    staging_dir: list[Path] = []  # the build loop's staging folder, once it exists

    def kv_scales() -> dict:  # calibrated once per build, on the fp32 variant built first
        if not scales:
            from vlm_export.quantize.calibration import calibration_set

            images, prompts = calibration_set(profile.calibration)
            with_image = (len(prompts) + 1) // 2 if images else 0  # calibration_requests: the even-numbered prompts
            with stage(f"calibrating the int8 KV cache on fp32's K/V ({len(prompts)} prompts, {with_image} with an image)"):
                scales.update(calibrate_kv_scales(staging_dir[0] / "fp32", images, prompts))
        return scales

    def kv_alone():  # the int8 KV cache on fp32 weights, screened once per build (see _kv_alone)
        if not screened:
            screened["quality"] = _kv_alone(staging_dir[0], kv_scales(), tokens)
        return screened["quality"]

    def build_stage(recipe: Recipe, staging: Path) -> dict:
        staging_dir[:] = [staging]
        if recipe.source is None and not prefetch:  # fp32, built now: the images fp32 CLIP-L will see, beside it
            prefetch.append(stack.enter_context(Prefetch.of_set(graphs, _fp32_images(profile, recipes))))
        return _build_variant(graphs, manifest, staging, recipe, profile, kv_scales, tokens, kv_alone, vision, reference)

    def reference() -> None:  # fp32's side of every measurement and screen, scored once (before the calibration)
        if not recorded:
            recorded.append(True)
            with stage(f"scoring fp32 on the eval prose ({tokens} tokens: every variant's reference side)"):
                record_reference(staging_dir[0] / "fp32", tokens)

    def key(recipe: Recipe) -> tuple:
        config = weight_config(recipe.name)
        return (config and config.__dict__, KV_INT8 in recipe.passes_on(GraphRole.DECODER) and (KV_RECIPE, profile.kv),
                NATIVE_KERNELS in recipe.passes_on(GraphRole.DECODER) and kernel_recipe(),
                recipe.budget and (tokens, BUILD_RECIPE))

    tokens = eval_tokens_for(profile.eval_tokens, manifest["model"])
    report = {"target": "cpu", "graphs": str(graphs), "layout": profile.layout, "eval_tokens": tokens,
              "message": f"run a variant with: vlm-export run {out / profile.variants[-1]} --prompt ..."}
    recipes, prefetch, recorded = recipes_for(profile), [], []
    # each image file through each vision graph once per build (image_encoder.py): calibration, the
    # int8-KV screen and every variant's scoring ask for the same ones
    with ExitStack() as stack, cached_images():
        return build_stages(manifest, out, force, recipes, report, build_stage, key, report_markdown)


@contextmanager
def while_exporting(profile: Profile, spec):
    """build.py's hook around the export and the build: the kernel library starts compiling, and as
    soon as the vision graph is exported the images fp32's vision graph will see start on a thread of
    their own (image_encoder.Prefetch), on a core the rest of the export leaves idle; closed when the
    build ends."""
    from vlm_export.kernels.library import compile_soon

    if any(native_kernels(profile, name) for name in profile.variants):
        compile_soon()  # the compiler's processes run beside the export
    with ExitStack() as stack:
        def on_graph(record: dict, directory: Path, sha256: str) -> None:
            if record.get("wrapper") == GraphRole.VISION:
                stack.enter_context(Prefetch.of_graph(record, directory, sha256, spec, _fp32_images(profile, recipes_for(profile))))
        yield on_graph


def _fp32_images(profile: Profile, recipes: list[Recipe]) -> list[Path]:
    """The image files the build runs through fp32's vision graph, in the order it asks: the
    calibration requests' (for an int8 KV cache), then the eval image (scoring's reference side)."""
    from vlm_export.quality.eval_set import eval_image
    from vlm_export.quantize.calibration import calibration_requests, calibration_set

    images = []
    if any(KV_INT8 in r.passes_on(GraphRole.DECODER) for r in recipes):
        images += [r.image for r in calibration_requests(*calibration_set(profile.calibration)) if r.image is not None]
    if any(r.budget for r in recipes) and eval_image() is not None:
        images.append(eval_image())
    return list(dict.fromkeys(images))


def _measure(fp32: Path, variant: Path, name: str, tokens: int, judge: bool) -> dict:
    from vlm_export.diff.end_to_end import accuracy_vs_fp32
    from vlm_export.quality.table import verdict

    accuracy = accuracy_vs_fp32(fp32, variant, tokens)
    judged = verdict(accuracy, RECIPES[name].budget) if judge else None
    return {"accuracy_vs_fp32": accuracy, "quality_budget": judged.to_dict() if judged else None}


SCREEN_TOKENS = 512  # --kv auto: eval positions an int8 KV cache must first pass on (the cache's loss grows with context)


def _screen_int8_kv(fp32: Path, variant: Path, name: str, tokens: int):
    """A quick verdict on the eval prose alone (no greedy answers, no long prompt); a cache that
    passes it is then measured in full like any variant."""
    from vlm_export.quality.metrics import BUDGETS
    from vlm_export.quality.scoring import measure

    with stage(f"screening {name}'s int8 KV cache ({min(tokens, SCREEN_TOKENS)} eval tokens)"):
        quality = measure(fp32, variant, min(tokens, SCREEN_TOKENS), greedy_tokens=0, long_prompt_tokens=0)
    return BUDGETS[RECIPES[name].budget].verdict(quality)


def _kv_alone(staging: Path, scales: dict, tokens: int):
    """The int8 KV cache's own cost: fp32's graphs with only the cache int8 (the decoder proto
    rewritten, its weights linked), scored against fp32 on the screening tokens. A cache that alone
    misses a variant's budget is not built into that variant: its loss adds to the weights' (smol:
    KL ~0.023 alone, against budgets of 0.005 and 0.01), and one screen replaces building and
    scoring an int8-KV copy of every quantized variant."""
    import onnx

    from vlm_export.artifacts import link_or_copy, read_manifest, remove_tree
    from vlm_export.onnx_wire import as_external, read_without_weights
    from vlm_export.quality.scoring import measure

    def rewrite(graph: dict, source: Path, out: Path) -> dict:
        data = source.with_name(source.name + ".data")
        if data.exists():
            link_or_copy(data, out / data.name)
        # fp32's inline weights are read where they are, through a link (onnx_wire.py): the decoder
        # is not parsed and written twice over (~5 s on smol)
        model, skipped = read_without_weights(source)
        if skipped:
            weights = out / f"{graph['file']}.weights"
            link_or_copy(source, weights)
            as_external(model, skipped, weights.name)
        onnx.save_model(model, str(out / graph["file"]))
        return quantize_kv_cache(out / graph["file"], scales, graph)

    screen = staging / "kv-int8-screen"
    remove_tree(screen)
    try:
        with stage(f"screening the int8 KV cache alone on fp32's weights ({min(tokens, SCREEN_TOKENS)} eval tokens)"):
            assemble_variant(staging / "fp32", screen, read_manifest(staging / "fp32"), {GraphRole.DECODER: rewrite},
                             target="cpu", variant="fp32-int8kv")
            return measure(staging / "fp32", screen, min(tokens, SCREEN_TOKENS), greedy_tokens=0, long_prompt_tokens=0)
    finally:
        remove_tree(screen)  # its links into fp32 keep their remembered digests


def _build_variant(graphs: Path, manifest: dict, staging: Path, recipe: Recipe, profile: Profile, kv_scales, tokens: int,
                   kv_alone=None, vision: VisionInt8Once | None = None, reference=None) -> dict:
    """One variant built and measured; with --kv auto an int8 KV cache that costs the budget is
    replaced by a float one (and the report says what the int8 cache scored). Seeded-random LLM
    weights are not judged: auto keeps the int8 cache there. `reference()`: called before the first
    screen or measurement (the build scores fp32's side of them there, once)."""
    from vlm_export.quality.metrics import BUDGETS

    name = recipe.name
    vision = vision or VisionInt8Once()
    reference = reference or (lambda: None)
    judge = not random_llm(manifest["model"])
    float_kv = dataclasses.replace(recipe, passes=tuple(p for p in recipe.passes if p.name != KV_INT8))
    int8_cache = float_kv != recipe
    attempts = [recipe, float_kv] if int8_cache and profile.kv == "auto" and judge else [recipe]

    def assemble(attempt: Recipe) -> dict:
        kv_int8 = KV_INT8 in attempt.passes_on(GraphRole.DECODER)
        shutil.rmtree(staging / name, ignore_errors=True)  # leftovers of an interrupted or rejected attempt
        started = time.perf_counter()
        with stage(f"assembling {name}" + (" (int8 KV cache)" if kv_int8 else "")):
            built = _variant(graphs, manifest, staging, attempt, kv_scales, vision)
        native = NATIVE_KERNELS in attempt.passes_on(GraphRole.DECODER)
        return {"seconds": round(time.perf_counter() - started, 1), "bytes": sum(f["bytes"] for f in built["files"].values()),
                "kv_cache": "int8" if kv_int8 else "fp32", "matmuls": matmul_kind(weight_config(name), native),
                "attention": attention_kind(built), "passes": [str(p) for p in attempt.passes],
                "weights": next((r["weight_origins"] for r in built.get("rewrites", {}).values()
                                 if isinstance(r, dict) and "weight_origins" in r), None)}

    rejected, prebuilt = None, None
    if len(attempts) > 1 and kv_alone is not None:
        # the float-KV attempt is assembled before the cache is screened: it is what auto keeps where
        # the cache alone misses the budget (smol), and its single-threaded assembly runs while the
        # image prefetch finishes the calibration's photos on the other core (measured: ~6 s idle)
        prebuilt = assemble(float_kv)
        reference()
        alone = BUDGETS[recipe.budget].verdict(kv_alone())
        if alone.passed:
            prebuilt = None  # the int8-KV attempt's assembly replaces it
        else:
            attempts, rejected = [float_kv], f"int8 KV cache alone (fp32 weights): {alone.line()}"
            step(f"{name}: the int8 KV cache alone misses the {name} budget; keeping the float KV cache")
    for attempt in attempts:
        kv_int8 = KV_INT8 in attempt.passes_on(GraphRole.DECODER)
        record = prebuilt if prebuilt is not None and attempt is float_kv else assemble(attempt)
        if recipe.budget is None:  # the baseline
            return record
        reference()
        if kv_int8 and len(attempts) > 1 and judge:
            screened = _screen_int8_kv(staging / "fp32", staging / name, name, tokens)
            if not screened.passed:  # no full measurement of a cache already known to cost the budget
                rejected = f"int8 KV cache: {screened.line()}"
                step(f"{name}: the int8 KV cache misses the budget; rebuilding with a float KV cache")
                continue
        with stage(f"measuring {name} against fp32 ({tokens} eval tokens)"):
            record.update(_measure(staging / "fp32", staging / name, name, tokens, judge))
            record["vision_vs_fp32"] = vision.accuracy_vs_fp32(staging / "fp32", staging / name)
        verdict = record["quality_budget"]
        if verdict:
            step(f"{name}: {verdict['line']}")
        if rejected:
            record["kv_int8_rejected"] = rejected
        if not (kv_int8 and len(attempts) > 1 and verdict and not verdict["passed"]):
            return record
        rejected = f"int8 KV cache: {verdict['line']}"
        step(f"{name}: the int8 KV cache misses the budget; rebuilding with a float KV cache")
    return record


def matmul_kind(config: WeightOnlyConfig | None, native: bool) -> str:
    if config is None:
        return "fp32 MatMul"
    return f"{config.describe()} on {'vlm-export kernel' if native else 'MatMulNBits'}"


def attention_kind(manifest: dict) -> str:
    """Which kernel runs the built variant's decoder attention (from its rewrite records)."""
    moved = sum(r.get("attention_kernel_nodes", 0) for r in manifest.get("rewrites", {}).values() if isinstance(r, dict))
    return f"vlm-export kernel ({moved} layers)" if moved else "ONNX Runtime"


def report_markdown(report: dict) -> str:
    """The variants table (size, matmul format, KV cache, quality columns and budget verdict against
    fp32, vision cosine), then one verdict line per quantized variant and where its weights came from."""
    from vlm_export.quality.table import HEADER, cells, judged_budget, note

    head = ["variant", "size MB", "assembly s", "matmuls", "KV cache", *HEADER, "vision cosine"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, v in report["variants"].items():
        acc, vision = v.get("accuracy_vs_fp32"), v.get("vision_vs_fp32")
        kv = v.get("kv_cache", "fp32") + (" (int8 missed the budget)" if v.get("kv_int8_rejected") else "")
        row = [name, f"{v['bytes'] / 1e6:.0f}", str(v["seconds"]), v.get("matmuls", "-"), kv,
               *cells(acc, judged_budget(v, RECIPES[name].budget), missing="baseline" if acc is None else "-"),
               f"{vision['cosine_min']:.5f}" if vision else "baseline"]
        lines.append("| " + " | ".join(row) + " |")
    variants = report["variants"].items()
    footer = note([v["accuracy_vs_fp32"] for _, v in variants if v.get("accuracy_vs_fp32")])
    lines += ["", footer] if footer else []
    details = ([f"- {name}: {v['quality_budget']['line']}" for name, v in variants if v.get("quality_budget")]
               + [f"- {name}: {v['kv_int8_rejected']} -> float KV cache" for name, v in variants if v.get("kv_int8_rejected")]
               + weight_lines(report["variants"])
               + [f"- {name} attention: {v['attention']}" for name, v in variants if v.get("attention")])
    lines += ["", *details] if details else []
    return "\n".join(lines) + "\n"
