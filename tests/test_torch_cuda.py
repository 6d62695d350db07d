"""`--backend torch-cuda`: the reference in fp16 on a CUDA GPU, through the same generation loop.
Without a GPU the backend says so in one line; with one, it must decode like the fp32 CPU reference."""

import numpy as np
import pytest
import torch

from vlm_export.errors import VlmExportError
from vlm_export.runtime.artifact_set import ArtifactSet
from vlm_export.runtime.generation import Generator, Request
from vlm_export.runtime.sampling import SamplingParams
from vlm_export.spec import resolve_spec

HAS_CUDA = torch.cuda.is_available()


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA GPU is present: the missing-GPU path does not apply")
def test_torch_cuda_without_gpu_is_one_clear_error():
    with pytest.raises(VlmExportError, match="needs a CUDA GPU"):
        Generator(ArtifactSet.from_spec(resolve_spec("tiny")), "torch-cuda")


def test_exported_backends_need_exported_graphs():
    with pytest.raises(VlmExportError, match="vlm-export export tiny"):
        Generator(ArtifactSet.from_spec(resolve_spec("tiny")), "ort")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_torch_cuda_decodes_like_the_cpu_reference(photo):
    artifacts = ArtifactSet.from_spec(resolve_spec("tiny"))
    request = Request.ask("Describe the image.", photo)
    runs = {}
    for backend in ("torch", "torch-cuda"):
        with Generator(artifacts, backend) as generator:
            embeds, _ = generator.encode(request, generator.image_embeds(photo))
            logits = generator.start([embeds], 4).logits
            result = generator.generate([request], SamplingParams(max_new_tokens=8))[0]
            runs[backend] = (logits[0], result.token_ids)
    (cpu_logits, cpu_ids), (gpu_logits, gpu_ids) = runs["torch"], runs["torch-cuda"]
    assert np.abs(gpu_logits - cpu_logits).max() < 2e-2 * max(1.0, np.abs(cpu_logits).max())  # fp16 vs fp32
    assert gpu_ids[:4] == cpu_ids[:4]
