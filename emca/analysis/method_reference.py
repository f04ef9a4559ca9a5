"""Each attention method's own published ResNet-50 figures, with their sources: the second reference of
Table 5's other rows, after the EMCA paper's own cells (paper_reference.py).

Units are the method paper's: parameters in decimal millions (`params_unit`: CBAM's 28.09, BAM's 25.92,
... are our sum(numel) / 10^6 to their digits; in the EMCA paper's 2^20 they would be 26.79, 24.72, ...),
GFLOPs in 10^9 multiply-accumulates (`gflops_unit`). Where the unit can be told it is 10^9: A2-Nets' plain
ResNet-50, 4.1, is torchvision's 4.09 x 10^9 conv and linear MACs (3.81 in 2^30), and the 4.12 of the
FcaNet / SA-Net / GC tables is that and a little more (4.12 x 2^30 would be 4.42 x 10^9); CBAM's and
BAM's plain 3.858 / 3.86 cannot be placed, and at their increments' printed digits (+0.006, +0.08)
ours print the same in either unit. Conventions differ in what else a counter counts (the same plain
ResNet-50 is 3.858, 3.86, 4.1 or 4.12 GFLOPs), so a method's GFLOPs are compared as its increment over
the same paper's plain ResNet-50 (`base_gflops`), which cancels the convention, unless `gflops_absolute`
says that the two figures are not of one count (EPSANet).

`base_top1` / `base_top5` hold the plain ResNet-50 a source compares its method with, where a text source
prints it: SE's Table 2 and SGE's README (GCT's README gives 76.2 against GCT's 77.3, without sizes, so GCT
has no entry). CBAM's, BAM's, FcaNet's, SA-Net's, EPSANet's, A2-Nets'
and GCNet's own baselines are printed only in their papers' tables, which no text source this project reads
holds; the EMCA paper's ResNet rows are the baseline its Table 5 compares with.

`reproduced` says whether our model of the method matches the printed figures to their digits
(tests/test_attention_table.py checks both ways, so a fixed gap or a new one fails a test); `note`
says why not where it does not. emca/analysis/tables.py sets these figures in brackets beside ours and the
EMCA paper's cells in Table 5, compared in these units at these digits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class MethodReference:
    label: str
    # None where no text source this project reads prints the figure (then `note` says what is printed)
    params: Optional[float]  # decimal millions, as printed
    params_digits: int  # decimals printed
    gflops: Optional[float]
    base_gflops: Optional[float]  # the same paper's plain ResNet-50
    gflops_digits: int
    top1: Optional[float]  # the method paper's own ResNet-50 top-1
    source: str
    top5: Optional[float] = None  # where its source prints one
    # The plain ResNet-50 the source compares with (its top-1 / top-5), where a text source prints it:
    # the method's gain is measured against it, not against another paper's ResNet-50.
    base_top1: Optional[float] = None
    base_top5: Optional[float] = None
    base_source: str = ""  # where that baseline is printed, when not in `source`
    # ((backbone, top-1), ...): the same source's figures on other backbones of the tables
    other_backbones: tuple[tuple[str, float], ...] = ()
    reproduced: bool = True
    note: str = ""
    params_unit: int = 10**6  # what the printed #P counts in
    gflops_unit: int = 10**9  # what the printed GFLOPs count in (multiply-accumulates)
    # Compare the printed GFLOPs as they stand, not as an increment over base_gflops: for a figure
    # printed without a plain ResNet-50 of the same count.
    gflops_absolute: bool = False


METHOD_REFERENCES: dict[str, MethodReference] = {
    # Table 2 prints SE-ResNet-50 23.29 / 6.62 and its ResNet-50 re-implementation 24.80 / 7.48 top-1 / top-5 error.
    "se": MethodReference("SE", 28.09, 2, 3.87, 3.86, 2, 76.71, "Hu et al., CVPR 2018 / TPAMI, Table 2 (SE-ResNet-50)",
                          base_top1=75.20, base_top5=92.52),
    "cbam": MethodReference("CBAM", 28.09, 2, 3.864, 3.858, 3, 77.34,
                            "Woo et al., ECCV 2018, Table 4 (ResNet50 + CBAM; top-1 error 22.66)"),
    "bam": MethodReference("BAM", 25.92, 2, 3.94, 3.86, 2, 75.98,
                           "Park et al., BMVC 2018, ImageNet table (ResNet50 + BAM; top-1 error 24.02)"),
    "fca": MethodReference("FcaNet", 28.07, 2, 4.13, 4.12, 2, 78.52,
                           "Qin et al., ICCV 2021, ImageNet comparison table; top-1 (R-50 78.52, R-34 75.07, "
                           "'Reported') from cfzd/FcaNet README @ aa5fb63", other_backbones=(("resnet34", 75.07),)),
    # The README's model table: 77.88 since its 2021-03-18 revision (0d14633; its evaluation line: Acc@1 77.882,
    # Acc@5 93.892), 77.75 in its 2021-03-10 ones (7614ac4, d01e5fb). No text this project reads prints 77.72.
    "sa": MethodReference("SANet", 25.56, 2, 4.12, 4.12, 2, 77.88,
                          "Zhang & Yang, ICASSP 2021, abstract (25.56 M, +2.76e-3 GFLOPs over 4.12); top-1 / top-5 "
                          "from wofmanaf/SA-Net README @ 3d40230 (sa_resnet50)", top5=93.89),
    # The README prints EPSANet-50 (Small) at 3.62 with no plain ResNet-50 of its own; the 4.12 beside it
    # is the plain ResNet-50 of the other papers' tables (FcaNet's, SA-Net's, GC's), not of the count
    # that gave 3.62: the EMCA paper's counter (docs/paper.md#units) in 10^9 gives EPSANet-50 3.62, the printed
    # figure, and the plain ResNet-50 4.11. So the printed figure itself is compared (tables.py); the
    # increment 3.62 - 4.12 mixes two counts (tests/test_tables_units.py checks both claims).
    "epsa": MethodReference("EPSANet", 22.56, 2, 3.62, 4.12, 2, 77.49,
                            "Zhang et al., 2021, murufeng/EPSANet README @ 9955041 model zoo, EPSANet-50 (Small)",
                            top5=93.54, gflops_absolute=True),
    "a2": MethodReference(
        "A2-Nets", 33.0, 1, 6.5, 4.1, 1, 77.0, "Chen et al., NeurIPS 2018, ImageNet table (ResNet-50 + 5 A2 blocks)",
        reproduced=False,
        note=("the paper does not say which 5 blocks carry the module nor their m, n; the Non-local placement "
              "(2 in res3, 3 in res4) with m = n = C/2 gives 32.91 M and +2.57 GFLOPs against 33.0 M and +2.4"),
    ),
    "gc": MethodReference("GC", 28.08, 2, 4.13, 4.12, 2, 77.70,
                          "Cao et al., GCNet 2019, ImageNet table (ResNet-50 + GC, r16, c3-c5)"),
    # The README's table prints SimAM-R50 (25.56 M, 4.11 G) and no plain ResNet-50 beside it. Its SimAM figures
    # are the plain networks' in a count with the BatchNorm outputs (thop, which it names, counts nothing for a
    # parameter-free module): emca.analysis.complexity.count_macs of the plain R-18/34/50/101 gives 1.82, 3.67,
    # 4.11, 7.83 x 10^9, the README's SimAM-R18/34/50/101 to their digits. base_gflops is that 4.11, inferred,
    # not printed.
    # CoordAtt has no entry: its authors print ImageNet figures for MobileNetV2 / MobileNeXt / EfficientNet only.
    "simam": MethodReference("SimAM", 25.56, 2, 4.11, 4.11, 2, 77.45,
                             "Yang et al., ICML 2021; ZjjConan/SimAM README @ ae98f43, ImageNet table (SimAM-R50)",
                             top5=93.66, other_backbones=(("resnet18", 71.31), ("resnet34", 74.49))),
    # SKNet-50 is ResNeXt-50 (32x4d) with SK units; its table's base, 4.24, is that ResNeXt-50 (25.0M).
    "sk": MethodReference(
        "SK", 27.5, 1, 4.47, 4.24, 2, 79.21,
        "Li et al., CVPR 2019, Table 2 (SKNet-50, 224 px, top-1 error 20.79); implus/SKNet README @ 17dd708",
        reproduced=False,
        note=("SKNet-50 is ResNeXt-50 (32x4d, 3x3 widths 128-1024) with SK units; on our ResNet-50 (widths 64-512, "
              "dense 3x3s holding 11.3 M) the same unit with G = 32 gives 15.32 M and -1.73 GFLOPs against 27.5 M "
              "and +0.23. On torchvision's resnext50_32x4d it gives 27,479,784 = 27.5 M and +0.23 GFLOPs over "
              "ResNeXt-50, the printed figures (tests/test_attn_sk.py)"),
    ),
    # The paper's ImageNet table as the authors' slides show it (LandskapeAI/slides @ 7184293,
    # docs/triplet/images/results_image_classification.png): 25.56M, 4.17G, top-1 / top-5 error 22.52 / 6.32; the
    # README prints the same model (k = 7) at 4.169 GFLOPs, error 22.52 / 6.326, and ResNet-18 (k = 7) at 28.91.
    # Neither prints a plain ResNet-50: base 4.12 is the plain ResNet-50 of the 10^9 count the table's other rows
    # use (SRM-ResNet-50 4.12G beside it; FcaNet's, SA-Net's and GC's tables). The README's k = 7 and k = 3 rows
    # (4.169, 4.131) are our conv increments (+0.0463, +0.0085) over one plain ResNet-50 between 4.1222 and 4.1230,
    # the 4.122 that SGE's table prints.
    "triplet": MethodReference("Triplet", 25.56, 2, 4.17, 4.12, 2, 77.48,
                               "Misra et al., WACV 2021, ImageNet table (ResNet-50 + triplet attention, k = 7; top-1 "
                               "error 22.52) as in LandskapeAI/slides @ 7184293; landskape-ai/triplet-attention README "
                               "@ 2cf02fb", top5=93.68, other_backbones=(("resnet18", 71.09),)),
    # The authors' README table (the paper's models): ResNet50 25.56M, 4.122 GFLOPs; SGE-ResNet50 25.56M, 4.127.
    "sge": MethodReference("SGE", 25.56, 2, 4.127, 4.122, 3, 77.584,
                           "Li, Hu and Yang, 2019 (arXiv:1905.09646); implus/PytorchInsight README @ 2864528, SGENet "
                           "classification table (SGE-ResNet50: top-1 77.5840, top-5 93.6640)", top5=93.664,
                           base_top1=76.384, base_top5=92.908),
}

# SRM's paper's ImageNet table as its official repository shows it (the README's figures/imagenet.png): top-1 /
# top-5 of the plain ResNet-50, SE-ResNet-50 and SRM-ResNet-50, by attention. They were trained SRM_EPOCHS epochs
# (the repository's imagenet.py defaults: lr 0.1, divided by 10 at epochs 31 and 61); the EMCA paper's R-50 ResNet,
# SE and SRM* accuracies are these figures (tables.py says so under the rows).
SRM_TABLE = {"none": (75.89, 92.85), "se": (76.80, 93.39), "srm": (77.13, 93.51)}
SRM_TABLE_SOURCE = "Lee et al., ICCV 2019, hyunjaelee410/style-based-recalibration-module @ f6221c7, README table"
SRM_EPOCHS = 90
