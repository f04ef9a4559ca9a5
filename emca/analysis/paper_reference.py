"""The paper's published numbers (ImageNet, and the few of COCO the project holds), kept as text and parsed on import.

The text blocks below are those of docs/paper.md#reference-figures, character for character
(tests/test_tables.py and tests/test_detection_tables.py check it), which says where each figure comes
from; the parser turns them into lookups. The paper's ImageNet units are binary (docs/paper.md#units):
its "M" parameters are 2^20, its GFLOPs 2^30 multiply-accumulates. Its detection figures are
MMDetection's, in 10^6 and 10^9 (docs/paper.md#tables-6-and-8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

PARAM_UNIT = 2**20  # the paper's "M": plain R-18/34/50 sum(numel) / 2^20 = 11.148 / 20.788 / 24.373
GFLOP_UNIT = 2**30  # the paper's "G" of multiply-accumulates
# Dataset and input size of every run behind these numbers (docs/paper.md#training-protocol): ours are compared with
# them only when measured the same way.
PROTOCOL = ("imagenet", 224)

# Table 2 / Table 3: FPS (batch 1), #P (M), top-1, top-5 for SE | ECA | SRM.
TABLE_2_3_TEXT = """\
R-18 all              187 11.231 70.59 89.78 | 192 11.148 70.75 89.74 | 154 11.152 70.96 89.81
R-18 first(=none)     204 11.189 70.91 89.96 | 212 11.148 70.63 89.85 | 165 11.150 71.31 90.07
R-18 last             204 11.189 70.92 89.83 | 212 11.148 70.81 89.84 | 165 11.150 71.04 90.00
R-18 prev_stage_last  156 11.189 71.02 89.98 | 174 11.148 70.83 89.96 | 123 11.150 71.20 90.00
R-18 prev_stage_all   160 11.190 71.00 90.00 | 170 11.148 71.04 89.99 | 113 11.150 71.02 90.00
R-18 all_stages_last  153 11.190 71.02 90.12 | 169 11.148 70.59 89.78 | 113 11.150 71.00 89.81
R-34 all              101 20.938 73.87 91.65 | 107 20.788 74.13 91.68 |  82 20.795 73.98 91.68
R-34 first(=none)     122 20.829 73.84 91.64 | 122 20.788 74.20 91.84 |  96 20.790 74.51 91.91
R-34 last             122 20.829 73.64 91.49 | 122 20.788 73.75 91.47 |  96 20.790 73.63 91.44
R-34 prev_stage_last  109 20.829 74.33 91.89 | 109 20.788 74.39 91.81 |  82 20.790 74.39 91.77
R-34 prev_stage_all   107 20.829 74.40 91.89 | 107 20.788 74.46 91.70 |  81 20.790 74.38 91.87
R-34 all_stages_last  103 20.829 74.02 91.74 | 108 20.788 74.14 91.81 |  80 20.790 74.57 91.90
R-50 all               90 26.772 76.80 93.39 |  87 24.373 77.12 93.68 |  71 24.402 77.13 93.51
R-50 first(=none)      97 25.037 76.56 93.28 |  98 24.373 77.02 93.49 |  81 24.380 76.98 93.41
R-50 last              97 25.037 75.71 92.60 |  98 24.373 76.37 93.18 |  81 24.380 76.73 93.26
R-50 prev_stage_last   88 25.037 77.10 93.49 |  94 24.373 76.98 93.55 |  70 24.380 77.00 93.72
R-50 prev_stage_all    90 25.037 77.33 93.52 |  92 24.373 77.13 93.49 |  70 24.380 77.20 93.54
R-50 all_stages_last   89 25.037 76.85 93.42 |  91 24.373 76.82 93.41 |  71 24.380 77.05 93.50
"""

# The authors' README at this commit prints the paper's Tables 2-5 as text (docs/paper.md#reference-figures);
# its earlier versions hold no table but Table 2, with the same figures.
README_COMMIT = "76bae427ea2f66979aed6a9dcef5e84ed922d14e"

# Table 4: #P (M), GFLOPs, top-1, top-5, FPS, FPS-dagger, FPS-double-dagger, rows as the README prints them.
# A star marks the rows the authors retrained; the unstarred ECA rows are ECA-Net's authors' own figures,
# which the table prints beside its retrained ECA* (the same model: the same size and speeds).
TABLE_4_TEXT = """\
R-18 ResNet    11.148 1.694 70.40 89.45 270 23552 859
R-18 SE        11.231 1.695 70.59 89.78 187 21760 839
R-18 EMCA-SE   11.190 1.695 71.00 90.00 160 17313 813
R-18 ECA       11.148 1.695 70.78 89.92 192 22287 848
R-18 ECA*      11.148 1.695 70.75 89.74 192 22287 848
R-18 EMCA-ECA  11.148 1.695 71.04 89.99 170 19023 833
R-18 SRM*      11.152 1.695 70.96 89.81 154 18794 823
R-18 EMCA-SRM  11.150 1.694 71.02 90.00 113 15190 803
R-34 ResNet    20.788 3.419 73.31 91.40 168 19712 840
R-34 SE        20.938 3.421 73.87 91.65 101 14279 805
R-34 EMCA-SE   20.829 3.421 74.41 91.90 107 14372 812
R-34 ECA       20.788 3.420 74.21 91.83 107 14067 825
R-34 ECA*      20.788 3.420 74.13 91.68 107 14067 825
R-34 EMCA-ECA  20.788 3.421 74.46 91.70 107 14080 822
R-34 SRM*      20.795 3.419 73.98 91.68  82 12655 803
R-34 EMCA-SRM  20.790 3.419 74.38 91.87  81 12579 795
R-50 ResNet    24.373 3.829 75.89 92.85 124 10032 668
R-50 SE        26.772 3.837 76.80 93.39  90  8156 597
R-50 EMCA-SE   25.037 3.835 77.33 93.52  90  8099 589
R-50 ECA       24.373 3.834 77.48 93.68  87  8517 591
R-50 ECA*      24.373 3.834 77.12 93.68  87  8517 591
R-50 EMCA-ECA  24.373 3.834 77.13 93.49  92  8615 600
R-50 SRM*      24.402 3.829 77.13 93.51  71  6745 536
R-50 EMCA-SRM  24.380 3.829 77.20 93.54  70  6698 532
"""

# Table 5: the same columns, every row as the README prints it (its order; N/A: no figure). Where it and
# Table 4 disagree on a cell, each holds its own (tables.py notes it).
TABLE_5_TEXT = """\
R-18 ResNet    11.148 1.694 70.40 89.45 270 23552 859
R-18 SE        11.231 1.695 70.59 89.78 187 21760 839
R-18 ECA*      11.148 1.695 70.75 89.74 192 22287 839
R-18 SRM*      11.152 1.694 70.96 89.81 154 18794 823
R-18 FcaNet*   11.231 1.694 70.98 90.00 119 17680 808
R-18 BAM       11.712 1.821 75.98 92.82  91  7159 527
R-18 CBAM      11.234 1.695 70.73 89.91 104  8734 789
R-18 EMCA-ECA  11.148 1.695 71.04 89.99 170 19023 833
R-18 EMCA-SRM  11.150 1.694 71.02 90.00 113 15190 803
R-18 EMCA-SE   11.190 1.695 71.00 90.00 160 17313 813
R-34 ResNet    20.788 3.419 73.31 91.4  168 19712 840
R-34 SE        20.938 3.421 73.87 91.65 101 14279 805
R-34 ECA*      20.788 3.420 74.13 91.68 107 14067 825
R-34 SRM*      20.795 3.419 73.98 91.68  82 12655 803
R-34 FcaNet*   20.938 3.419 74.18 91.75  87 13094 812
R-34 CBAM      20.943 3.420 74.01 91.76  59 12001 760
R-34 EMCA-ECA  20.788 3.421 74.46 91.70 107 14080 822
R-34 EMCA-SRM  20.790 3.419 74.38 91.87  81 12579 795
R-34 EMCA-SE   20.829 3.421 74.41 91.90 107 14372 812
R-50 ResNet    24.373 3.829 75.89 92.85 124 10032 668
R-50 SE        26.772 3.837 76.80 93.39  90  8156 597
R-50 ECA*      24.373 3.834 77.12 93.68  87  8517 591
R-50 SRM*      24.402 3.829 77.13 93.51  71  6745 536
R-50 FcaNet*   26.772 3.831 77.27 93.70  74  7984 549
R-50 EPSANet*  21.517 3.373 77.31 93.72  28   802 388
R-50 SANet*    24.373 3.832 77.25 93.66  68  6670 406
R-50 A2-Nets   33.006 6.502 77.00 93.50 N/A   N/A N/A
R-50 BAM       25.92  3.946 75.98 92.82  91  7159 527
R-50 CBAM      26.775 3.837 77.34 93.69  55  2460 208
R-50 EMCA-ECA  24.373 3.834 77.13 93.49  92  8615 600
R-50 EMCA-SRM  24.380 3.829 77.20 93.54  71  6698 532
R-50 EMCA-SE   25.037 3.835 77.33 93.52  90  8099 589
"""

# Tables 6 and 8 (COCO, R-50-FPN detectors, docs/paper.md#tables-6-and-8): of their figures the project holds only
# the plain detectors' #P and GFLOPs, MMDetection's counts (emca/analysis/detection_complexity.py): trainable
# parameters in 10^6 and multiply-adds of one 1280 x 800 image in 10^9, decimal units unlike Tables 2-5's.
TABLE_6_PLAIN_TEXT = """\
Faster R-CNN  41.53 207.07
Mask R-CNN    44.18 275.58
RetinaNet     37.74 239.32
"""
DETECTION_PARAM_UNIT = 10**6
DETECTION_GFLOP_UNIT = 10**9
# Dataset and shorter image side of the paper's detection runs (MMDetection's 1333 x 800 resize).
DETECTION_PROTOCOL = ("coco", 800)
DETECTOR_BY_LABEL = {"Faster R-CNN": "faster_rcnn", "Mask R-CNN": "mask_rcnn", "RetinaNet": "retinanet"}
DETECTOR_LABEL = {name: label for label, name in DETECTOR_BY_LABEL.items()}

BACKBONE_BY_SHORT_NAME = {"R-18": "resnet18", "R-34": "resnet34", "R-50": "resnet50"}
SHORT_NAME = {name: short for short, name in BACKBONE_BY_SHORT_NAME.items()}
KINDS = ("se", "eca", "srm")



@dataclass(frozen=True)
class Reference:
    """One published measurement; a field the paper does not give is None."""

    params: Optional[float] = None  # in PARAM_UNIT (2^20) parameters
    gflops: Optional[float] = None  # in GFLOP_UNIT (2^30) multiply-accumulates, at 224 px
    top1: Optional[float] = None
    top5: Optional[float] = None
    fps: Optional[float] = None  # batch 1, one loader worker
    fps_model: Optional[float] = None  # FPS-dagger: model alone, batch 256
    fps_pipeline: Optional[float] = None  # FPS-double-dagger: whole val pass, batch 256, 8 workers


@dataclass(frozen=True)
class DetectionReference:
    """A published figure of Tables 6 and 8; None where the project does not hold it (every AP)."""

    params: Optional[float] = None  # in DETECTION_PARAM_UNIT (10^6) trainable parameters
    gflops: Optional[float] = None  # in DETECTION_GFLOP_UNIT (10^9) multiply-adds at 1280 x 800


def _parse_table_2_3(text: str) -> dict[tuple[str, str, str], Reference]:
    """{(backbone, row label, kind): Reference} from the Table 2/3 block."""
    table = {}
    for line in text.splitlines():
        short, row, rest = line.split(None, 2)
        for kind, cell in zip(KINDS, rest.split("|"), strict=True):
            fps, params, top1, top5 = (float(value) for value in cell.split())
            table[(BACKBONE_BY_SHORT_NAME[short], row, kind)] = Reference(params=params, top1=top1, top5=top5, fps=fps)
    return table


def _figure(text: str) -> Optional[float]:
    return None if text == "N/A" else float(text)


def _parse_table_4_5(text: str) -> dict[tuple[str, str], Reference]:
    """{(backbone, row label as printed, the retrained-by-the-authors star kept): Reference} of a Table 4 or 5 block."""
    table = {}
    for line in text.splitlines():
        short, method, *values = line.split()
        params, gflops, top1, top5, fps, fps_model, fps_pipeline = (_figure(value) for value in values)
        table[(BACKBONE_BY_SHORT_NAME[short], method)] = Reference(
            params=params, gflops=gflops, top1=top1, top5=top5, fps=fps, fps_model=fps_model, fps_pipeline=fps_pipeline
        )
    return table


def _parse_table_6_plain(text: str) -> dict[str, DetectionReference]:
    """{detector: DetectionReference} of the plain R-50-FPN rows."""
    table = {}
    for line in text.splitlines():
        label, params, gflops = line.rsplit(None, 2)
        table[DETECTOR_BY_LABEL[label.strip()]] = DetectionReference(params=float(params), gflops=float(gflops))
    return table


TABLE_2_3 = _parse_table_2_3(TABLE_2_3_TEXT)
TABLE_4 = _parse_table_4_5(TABLE_4_TEXT)
TABLE_5 = _parse_table_4_5(TABLE_5_TEXT)
TABLE_6_PLAIN = _parse_table_6_plain(TABLE_6_PLAIN_TEXT)

# Methods the paper marks with '*' (in Table 4 or 5): rows its authors retrained under their protocol.
RETRAINED_BY_AUTHORS = frozenset(label.rstrip("*") for _, label in (*TABLE_4, *TABLE_5) if label.endswith("*"))


def printed_label(table: dict[tuple[str, str], Reference], backbone: str, label: str) -> str:
    """A row's label as the table prints it on this backbone: with the star where that row is the authors'
    retrain, as printed where the table has the row, the plain label where it has none."""
    return label + "*" if (backbone, label + "*") in table else label
