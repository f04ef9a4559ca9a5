"""The DALI loader's CUDA paths, checked on the CPU where a CPU can check them: the `mixed` pipeline
is the CPU one with its devices changed (one set of decoder options, fancy upsampling on), the CPU
decoder gives PIL's pixels on real photographs, the batches leave the pipeline on the GPU only for a
CUDA device. The graph is defined and inspected without being built, which would need CUDA.
"""
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from nvidia.dali import fn, pipeline_def  # noqa: E402

from emca.data.config import DatasetConfig, LoaderConfig  # noqa: E402
from emca.data.dali_loader import DECODER, DaliLoader, reader_options  # noqa: E402
from emca.data.folder import ImageList  # noqa: E402
from emca.data.torch_loader import load_rgb  # noqa: E402
from emca.data.transforms import Preprocessing  # noqa: E402

DECODERS = ("decoders__Image", "decoders__ImageRandomCrop")
# The training graphs to compare: ImageNet's crop, Tiny-ImageNet's padded crop, and a policy with
# erasing (its conditional branches put more operators on the GPU).
TRAIN_OPTIONS = {
    "random-resized": {},
    "pad-random": dict(train_crop="pad_random", crop_padding=4),
    "policy-and-erasing": dict(auto_augment="trivialaugment", random_erasing=0.5),
}


def dali_loader(device: str, *, train: bool = True, use_gpu: bool = True, **dataset) -> DaliLoader:
    """A DaliLoader over two (absent) files: enough to define its pipeline."""
    prep = Preprocessing.from_config(DatasetConfig(name="imagefolder", image_size=32, val_resize=36, **dataset))
    images = ImageList(["/absent/a.jpg", "/absent/b.jpg"], np.zeros(2, dtype=np.int64), ["a"])
    return DaliLoader.from_files(
        images, prep, lambda epoch: np.arange(2), train=train, batch_size=2, workers=1, seed=0, rank=0,
        device=torch.device(device), channels_last=True, prefetch_queue_depth=1, use_gpu=use_gpu,
        reader=reader_options(LoaderConfig()),
    )


def graph(loader: DaliLoader) -> tuple[list, list[str]]:
    """([(operator schema, device, arguments)], the outputs' devices) of the loader's pipeline, defined
    but not built. Pipeline._build_graph, _ops, _init_args and _graph_outputs are DALI 2.4's own
    (nvidia/dali/pipeline.py); a DALI that renames them fails here loudly."""
    pipeline = loader._pipeline()
    pipeline._build_graph()
    operators = [(op._op.schema_name, op._op.device, {key: value for key, value in op._op._init_args.items()
                                                      if not key.startswith("_")}) for op in pipeline._ops]
    return operators, [node.device for node in pipeline._graph_outputs]


def without_devices(operators: list) -> list:
    return [(schema, arguments) for schema, _, arguments in operators]


@pytest.mark.parametrize("options", TRAIN_OPTIONS.values(), ids=TRAIN_OPTIONS.keys())
def test_the_cuda_training_pipeline_is_the_cpu_one_on_other_devices(options):
    (cpu, cpu_outputs), (cuda, cuda_outputs) = graph(dali_loader("cpu", **options)), graph(
        dali_loader("cuda:0", **options))
    assert without_devices(cuda) == without_devices(cpu)
    decoders = [(device, arguments) for schema, device, arguments in cpu + cuda if schema in DECODERS]
    assert [device for device, _ in decoders] == ["cpu", "mixed"]
    assert all(arguments.items() >= DECODER.items() for _, arguments in decoders)
    assert DECODER["jpeg_fancy_upsampling"] is True
    # Images and labels leave the pipeline on the GPU for a CUDA device only.
    assert cpu_outputs == ["cpu", "cpu"] and cuda_outputs == ["gpu", "gpu"]


def test_the_cuda_validation_pipeline_is_the_cpu_one_on_other_devices():
    (cpu, cpu_outputs), (cuda, cuda_outputs) = (graph(dali_loader(device, train=False)) for device in ("cpu", "cuda:0"))
    assert without_devices(cuda) == without_devices(cpu)
    assert [device for schema, device, _ in cpu + cuda if schema in DECODERS] == ["cpu", "mixed"]
    assert cpu_outputs == ["cpu", "cpu"] and cuda_outputs == ["gpu", "gpu"]


def test_cpu_decoding_for_a_cuda_device_hands_over_on_the_gpu():
    # loader.dali_use_gpu=false on a CUDA node: decoding and augmentation on CPU threads, and DALI copies
    # the finished batch from its pinned buffers instead of PyTorch copying pageable float32.
    loader = dali_loader("cuda:0", use_gpu=False)
    operators, outputs = graph(loader)
    assert not loader.gpu and loader.cuda
    assert {device for _, device, _ in operators} == {"cpu"} and outputs == ["gpu", "gpu"]
    assert loader._pipeline().device_id == 0
    assert dali_loader("cpu", use_gpu=False)._pipeline().device_id is None


def decoded(files: list[str], device: str, **options) -> list[np.ndarray]:
    """Each file through DALI's image decoder on `device` (DECODER's options unless overridden), as HWC uint8."""
    @pipeline_def
    def decode():
        encoded, _ = fn.readers.file(files=files, labels=list(range(len(files))), random_shuffle=False)
        return fn.decoders.image(encoded, device=device, **{**DECODER, **options})

    pipeline = decode(batch_size=1, num_threads=1, device_id=0 if device == "mixed" else None, seed=0,
                      prefetch_queue_depth=1)
    pipeline.build()
    images = []
    for _ in files:
        (batch,) = pipeline.run()
        batch = batch.as_cpu() if device == "mixed" else batch
        images.append(np.asarray(batch.as_tensor())[0])
    return images


def photographs(shared_data) -> list[str]:
    """The 241 full-size ImageNet photographs (mixed chroma subsampling, 23 greyscale, 65 with ICC
    profiles) and Tiny-ImageNet's 1,000 validation JPEGs (64x64, some greyscale)."""
    return sorted(str(path) for pattern in ("imagenet-samples/*/*.JPEG", "tinyimagenet-subset/val/*/*.JPEG")
                  for path in shared_data.glob(pattern))


def test_the_cpu_decoder_gives_pils_pixels_on_real_photographs(shared_data):
    # libjpeg-turbo in both, fancy upsampling in both: measured equal to the bit (DALI 2.4, Pillow 13),
    # which tests/test_pixel_formats.py's JPEG_LEVELS allows to drift by a few levels elsewhere.
    files = photographs(shared_data)
    assert len(files) == 1241
    unequal = [file for file, image in zip(files, decoded(files, "cpu"), strict=True)
               if not np.array_equal(image, np.asarray(load_rgb(file)))]
    assert not unequal, unequal[:5]


def chroma_edges(folder, size: tuple[int, int], subsampling: int) -> str:
    """A JPEG of saturated colour blocks and noise (sharp chroma edges, odd sizes), subsampled 4:2:0 (2),
    4:2:2 (1) or not (0)."""
    rng = np.random.default_rng(size[0] * 10 + subsampling)
    blocks = rng.integers(0, 256, (size[1] // 7 + 1, size[0] // 5 + 1, 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((7, 5, 1), dtype=np.uint8))[:size[1], :size[0]]
    pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
    path = folder / f"{size[0]}x{size[1]}-{subsampling}.jpg"
    Image.fromarray(pixels).save(path, quality=90, subsampling=subsampling)
    return str(path)


@pytest.mark.cuda
def test_the_mixed_decoder_upsamples_chroma_as_the_cpu_one(tmp_path):
    # Generated files, so that the device machine (without ../shared/data) runs it. nvJPEG's IDCT
    # rounds differently from libjpeg-turbo's: equality is not expected. Chroma upsampling was the large
    # difference (colour edges off by tens of levels): with fancy upsampling the mixed decode must be
    # closer to the CPU one than with nvJPEG's default, and within a grey level on average.
    files = [chroma_edges(tmp_path, size, subsampling) for size in ((97, 61), (640, 427)) for subsampling in (2, 1)]
    cpu = decoded(files, "cpu")
    fancy, plain = decoded(files, "mixed"), decoded(files, "mixed", jpeg_fancy_upsampling=False)

    def mean_levels(images):
        return np.mean([np.abs(a.astype(np.int16) - b).mean() for a, b in zip(images, cpu, strict=True)])

    assert [image.shape for image in fancy] == [image.shape for image in cpu]
    assert mean_levels(fancy) < mean_levels(plain), (mean_levels(fancy), mean_levels(plain))
    assert mean_levels(fancy) < 1.0, mean_levels(fancy)
