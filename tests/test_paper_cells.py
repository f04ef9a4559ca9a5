"""The EMCA paper's own cells as the project holds them, checked against the authors' README, and what the
tables print about them: where the paper's tables disagree, a probable error of the source, the second
references and their sources, the table without published figures (Table 9), and the two readings of the
authors' code that decide the presets (ECA's kernel, the stem).

Every literal below was read from github.com/eslambakr/EMCA, README.md at commit
76bae427ea2f66979aed6a9dcef5e84ed922d14e (2021-11-24, the README's newest version; the only one with Tables
3-5), unless a comment names another source.
"""

from __future__ import annotations

import math

import pytest
import torch

from emca.analysis import paper_reference as paper
from emca.analysis.complexity import build_variant
from emca.analysis.method_reference import METHOD_REFERENCES, SRM_TABLE
from emca.analysis.tables import (
    PARAM_DIFFERENCES,
    TABLES,
    Measured,
    complexity_table,
    disagreements,
    fill_table,
)
from emca.analysis.variants import Variant, channel_attention, emca, plain
from emca.layers.excitation import ECAExcitation, SRMExcitation, eca_kernel_size
from emca.models.summary import count_parameters

UNIT = 2**20


def test_the_reference_commit_is_the_readmes_newest():
    assert paper.README_COMMIT == "76bae427ea2f66979aed6a9dcef5e84ed922d14e"


# ----------------------------------------------------------------------------- the README's figures
@pytest.mark.parametrize("backbone, row, kind, figures", [
    # Table 2 ("Avoid Dense Integration Results") and Table 3 ("Results"): FPS, #P, top-1, top-5.
    ("resnet18", "all", "srm", (154, 11.152, 70.96, 89.81)),
    ("resnet34", "last", "eca", (122, 20.788, 73.75, 91.47)),
    ("resnet50", "first(=none)", "se", (97, 25.037, 76.56, 93.28)),
    ("resnet18", "all_stages_last", "se", (153, 11.190, 71.02, 90.12)),
    ("resnet34", "prev_stage_all", "se", (107, 20.829, 74.40, 91.89)),
    ("resnet50", "prev_stage_last", "srm", (70, 24.380, 77.00, 93.72)),
])
def test_tables_2_and_3_hold_the_readmes_figures(backbone, row, kind, figures):
    reference = paper.TABLE_2_3[(backbone, row, kind)]
    assert (reference.fps, reference.params, reference.top1, reference.top5) == figures


def _row(reference: paper.Reference) -> tuple:
    return (reference.params, reference.gflops, reference.top1, reference.top5, reference.fps, reference.fps_model,
            reference.fps_pipeline)


@pytest.mark.parametrize("backbone, label, figures", [
    # #P, GFLOPs, top-1, top-5, FPS, FPS*, FPS** (the README's names of FPS-dagger and FPS-double-dagger).
    ("resnet18", "ECA", (11.148, 1.695, 70.78, 89.92, 192, 22287, 848)),  # "+ECANet", unstarred
    ("resnet18", "ECA*", (11.148, 1.695, 70.75, 89.74, 192, 22287, 848)),
    ("resnet34", "ECA", (20.788, 3.420, 74.21, 91.83, 107, 14067, 825)),
    ("resnet34", "EMCA-SE", (20.829, 3.421, 74.41, 91.90, 107, 14372, 812)),  # "74.41 (96)": the RI not held
    ("resnet50", "ECA", (24.373, 3.834, 77.48, 93.68, 87, 8517, 591)),
    ("resnet50", "EMCA-SRM", (24.380, 3.829, 77.20, 93.54, 70, 6698, 532)),
])
def test_table_4_holds_the_readmes_figures(backbone, label, figures):
    assert _row(paper.TABLE_4[(backbone, label)]) == figures


@pytest.mark.parametrize("backbone, label, figures", [
    ("resnet18", "ECA*", (11.148, 1.695, 70.75, 89.74, 192, 22287, 839)),
    ("resnet18", "SRM*", (11.152, 1.694, 70.96, 89.81, 154, 18794, 823)),
    ("resnet18", "FcaNet*", (11.231, 1.694, 70.98, 90.00, 119, 17680, 808)),  # "FCANet*"
    ("resnet18", "BAM", (11.712, 1.821, 75.98, 92.82, 91, 7159, 527)),
    ("resnet18", "CBAM", (11.234, 1.695, 70.73, 89.91, 104, 8734, 789)),
    ("resnet34", "ResNet", (20.788, 3.419, 73.31, 91.4, 168, 19712, 840)),
    ("resnet34", "FcaNet*", (20.938, 3.419, 74.18, 91.75, 87, 13094, 812)),
    ("resnet34", "CBAM", (20.943, 3.420, 74.01, 91.76, 59, 12001, 760)),
    ("resnet50", "FcaNet*", (26.772, 3.831, 77.27, 93.70, 74, 7984, 549)),
    ("resnet50", "EPSANet*", (21.517, 3.373, 77.31, 93.72, 28, 802, 388)),
    ("resnet50", "SANet*", (24.373, 3.832, 77.25, 93.66, 68, 6670, 406)),
    ("resnet50", "A2-Nets", (33.006, 6.502, 77.00, 93.50, None, None, None)),  # "A^2Nets", speeds N/A
    ("resnet50", "BAM", (25.92, 3.946, 75.98, 92.82, 91, 7159, 527)),
    ("resnet50", "CBAM", (26.775, 3.837, 77.34, 93.69, 55, 2460, 208)),
    ("resnet50", "EMCA-SRM", (24.380, 3.829, 77.20, 93.54, 71, 6698, 532)),
])
def test_table_5_holds_the_readmes_figures(backbone, label, figures):
    assert _row(paper.TABLE_5[(backbone, label)]) == figures


def test_table_5_holds_every_row_the_readme_prints_and_marks_the_authors_retrains():
    rows = {backbone: [label for b, label in paper.TABLE_5 if b == backbone] for backbone in ("resnet18", "resnet34")}
    assert rows["resnet18"] == ["ResNet", "SE", "ECA*", "SRM*", "FcaNet*", "BAM", "CBAM", "EMCA-ECA", "EMCA-SRM",
                                "EMCA-SE"]
    assert rows["resnet34"] == ["ResNet", "SE", "ECA*", "SRM*", "FcaNet*", "CBAM", "EMCA-ECA", "EMCA-SRM", "EMCA-SE"]
    table5 = {(entry.backbone, entry.row) for entry in TABLES["table5"].entries}
    assert set(paper.TABLE_5) <= table5
    assert {"FcaNet*", "EPSANet*", "SANet*", "ECA*", "SRM*"} <= {row for _, row in table5}


# ----------------------------------------------------------------------------- what the tables print
def _table5(backbone: str, attention: str) -> Variant:
    return next(v for v in TABLES["table5"].variants() if (v.backbone, v.attention) == (backbone, attention))


def _full(name: str):
    return fill_table(TABLES[name], {}, full=True)


def test_where_the_papers_tables_disagree_each_holds_its_own_and_a_note_says_so():
    table4, table5, table3 = _full("table4"), _full("table5"), _full("table3")
    assert (paper.TABLE_4[("resnet18", "ECA*")].fps_pipeline, paper.TABLE_5[("resnet18", "ECA*")].fps_pipeline) == (
        848, 839)
    cells = {(row[0], row[1]): dict(zip(table4.header, row, strict=True)) for row in table4.rows}
    assert cells[("R-18", "ECA*")]["FPS‡"] == "– / 848"
    assert {(row[0], row[1]): row[table5.header.index("FPS‡")] for row in table5.rows}[("R-18", "ECA*")] == "– / 839"
    [note4] = [note for note in table4.notes if note.startswith("The paper's tables print some cells")]
    for text in ("R-18 ECA* FPS‡ 848 (Table 5: 839)", "R-18 SRM* GFLOPs 1.695 (Table 5: 1.694)",
                 "R-34 EMCA-SE top-1 74.41 (Table 3: 74.40)", "R-34 EMCA-SE top-5 91.90 (Table 3: 91.89)",
                 "R-50 EMCA-SRM FPS 70 (Table 5: 71)"):
        assert text in note4
    [note5] = [note for note in table5.notes if note.startswith("The paper's tables print some cells")]
    assert "R-50 EMCA-SRM FPS 71 (Tables 3 and 4: 70)" in note5 and "R-18 ECA* FPS‡ 839 (Table 4: 848)" in note5
    [note3] = [note for note in table3.notes if note.startswith("The paper's tables print some cells")]
    assert "R-34 EMCA prev_stage_all SE top-1 74.40 (Tables 4 and 5: 74.41)" in note3
    # Exactly these cells: nothing else of Tables 2-5 disagrees.
    found = [cell for name in ("table2", "table3", "table4", "table5")
             for cell in disagreements(TABLES[name], TABLES[name].entries, TABLES[name].metrics)]
    assert len(found) == 3 + 5 + 5  # Table 3's, Table 4's, Table 5's; Table 2 agrees with all


def test_a_run_table_prints_the_disagreement_of_the_rows_it_shows_only():
    measured = {channel_attention("resnet18", "eca"): Measured.single({"top1": 70.0})}
    notes = fill_table(TABLES["table4"], measured).notes
    [note] = [note for note in notes if note.startswith("The paper's tables print some cells")]
    assert note.endswith("each table holds its own: R-18 ECA* FPS‡ 848 (Table 5: 839).")


def test_the_r18_bam_row_is_held_as_printed_and_flagged():
    r18, r50 = paper.TABLE_5[("resnet18", "BAM")], paper.TABLE_5[("resnet50", "BAM")]
    assert (r18.top1, r18.top5, r18.fps, r18.fps_model, r18.fps_pipeline) == (
        r50.top1, r50.top5, r50.fps, r50.fps_model, r50.fps_pipeline)
    assert r18.params != r50.params
    flag = ("R-18 BAM: the paper's row repeats its R-50 BAM row's top-1, top-5 and speeds (75.98 / 92.82; 91, 7159, "
            "527) with an R-18 size (11.712 / 1.821): held as printed, a probable error of the source.")
    assert flag in _full("table5").notes
    assert flag in fill_table(TABLES["table5"], {_table5("resnet18", "bam"): Measured.single({"top1": 70.0})}).notes
    assert flag not in fill_table(TABLES["table5"], {plain("resnet50"): Measured.single({"top1": 75.0})}).notes


def test_second_references_print_in_brackets_with_their_sources():
    table5 = _full("table5")
    cells = {(row[0], row[1]): dict(zip(table5.header, row, strict=True)) for row in table5.rows}
    assert cells[("R-50", "FcaNet*")]["top-1"] == "– / 77.27 [78.52]"  # cfzd/FcaNet README, "Reported"
    assert cells[("R-34", "FcaNet*")]["top-1"] == "– / 74.18 [75.07]"
    assert cells[("R-50", "EPSANet*")]["top-5"] == "– / 93.72 [93.54]"  # murufeng/EPSANet README
    assert cells[("R-50", "CBAM")]["#P (M)"] == "– / 26.775 [10^6: – / 28.09]"
    # Every method's source (SE's rows are the paper's own), in the table of every method: ca_all.
    [sources] = [note for note in _full("ca_all").notes if note.startswith("Second references [...]: ")]
    listed = "; " + sources.removeprefix("Second references [...]: ")
    for name in sorted(set(METHOD_REFERENCES) - {"se"}):
        assert f"; {METHOD_REFERENCES[name].label}: {METHOD_REFERENCES[name].source}" in listed, name
    # With the plain ResNet-50 a source compares with, where it prints one.
    assert f"{METHOD_REFERENCES['sge'].source}; its plain ResNet-50: 76.38 / 92.91" in listed
    assert table5.notes[0].startswith("Cells: ours / paper (ours - paper), ours measured on imagenet at 224 px as the "
                                      "paper's were; [...]: a second reference")
    # Table 4: ECA-Net's own accuracies after the retrained ECA*'s, and where they come from.
    table4 = _full("table4")
    cells = {(row[0], row[1]): dict(zip(table4.header, row, strict=True)) for row in table4.rows}
    assert (cells[("R-18", "ECA*")]["top-1"], cells[("R-34", "ECA*")]["top-5"], cells[("R-50", "ECA*")]["top-1"]) == (
        "– / 70.75 [70.78]", "– / 91.68 [91.83]", "– / 77.12 [77.48]")
    [eca] = [note for note in table4.notes if note.startswith("Second references [...]: ECA*: ECA-Net's authors'")]
    assert "77.42 / 93.62 since" in eca and "70.92 / 89.93 for ECA-Net18" in eca


def test_a_table_without_a_second_reference_in_its_rows_does_not_explain_brackets():
    table = fill_table(TABLES["table4"], {plain("resnet18"): Measured.single({"top1": 70.0})})
    assert not any("[...]" in note for note in table.notes)


def test_sa_nets_top_1_is_its_readmes_and_no_unsourced_figure_remains():
    """wofmanaf/SA-Net README @ 3d40230: 'sa_resnet50 | 77.88 | 25.56', 'Acc@1 77.882 Acc@5 93.892'."""
    sa = METHOD_REFERENCES["sa"]
    assert (sa.top1, sa.top5, sa.params) == (77.88, 93.89, 25.56) and "wofmanaf/SA-Net README" in sa.source


def test_the_r50_resnet_se_and_srm_rows_are_srms_90_epoch_table_and_a_note_says_so():
    """SRM's README table (figures/imagenet.png): ResNet-50 75.89 / 92.85, SE-ResNet-50 76.80 / 93.39,
    SRM-ResNet-50 77.13 / 93.51."""
    assert SRM_TABLE == {"none": (75.89, 92.85), "se": (76.80, 93.39), "srm": (77.13, 93.51)}
    for attention, label in (("none", "ResNet"), ("se", "SE"), ("srm", "SRM*")):
        reference = paper.TABLE_4[("resnet50", label)]
        assert (reference.top1, reference.top5) == SRM_TABLE[attention] == (
            paper.TABLE_5[("resnet50", label)].top1, paper.TABLE_5[("resnet50", label)].top5)
    for name in ("table4", "table5"):
        [note] = [note for note in _full(name).notes if note.startswith("R-50 ResNet, SE, SRM*: ")]
        assert "trained 90 epochs, not a 100-epoch retrain" in note
    measured = {channel_attention("resnet18", "se"): Measured.single({"top1": 70.0})}
    assert not any(note.startswith("R-50 ResNet") for note in fill_table(TABLES["table4"], measured).notes)


def test_table_9_says_the_paper_prints_no_figure_of_it():
    note = ("Rotated columns: ours alone: the paper prints no figure of Table 9, neither in its text nor in the "
            "authors' README (github.com/eslambakr/EMCA); top-1 is the unrotated accuracy, beside Table 4's.")
    assert note in _full("table9").notes
    measured = {plain("resnet18"): Measured.single({"top1": 70.0, "top1_rot90": 20.0})}
    table = fill_table(TABLES["table9"], measured)
    assert note in table.notes and table.rows[0][3] == "20.00"


def test_a_complexity_table_prints_the_notes_of_its_columns():
    counts = {variant: (0, 1.0) for variant in TABLES["table5"].variants()}
    notes = complexity_table(TABLES["table5"], counts).notes
    [note] = [note for note in notes if note.startswith("The paper's tables print some cells")]
    assert note.endswith("each table holds its own: R-18 SRM* GFLOPs 1.694 (Table 4: 1.695).")
    assert any(note.startswith("Second references [...]: CBAM: ") for note in notes)  # its #P and GFLOPs brackets
    assert not any("ECA-Net's authors'" in note for note in complexity_table(TABLES["table4"], {
        variant: (0, 1.0) for variant in TABLES["table4"].variants()}).notes)  # no accuracy column: no ECA bracket


# ----------------------------------------------------------------------------- ECA's kernel
def _authors_kernel(width: int) -> int:
    """Code/eca_resnet_multi_scale.py (the model Code/train_imagenet.py builds), as the authors wrote it:
    t = int(abs((math.log(out_channels * self.expansion, 2) + b) / gamma)); k_size = t if t % 2 else t + 1."""
    t = int(abs((math.log(width, 2) + 1) / 2))
    return t if t % 2 else t + 1


def _eca_kernels(variant: Variant) -> list[tuple[int, int]]:
    """(channels, kernel) of every ECA excitation of a model, in forward order."""
    found = []
    with torch.device("meta"):
        model = build_variant(variant)
    for module in model.modules():
        if isinstance(module, ECAExcitation):
            module.register_forward_pre_hook(
                lambda module, args: found.append((args[0].shape[1], module.conv.kernel_size[0])))
    model(torch.zeros(1, 3, 64, 64, device="meta"))
    return found


def test_the_adaptive_kernel_is_the_authors_imagenet_code_kernel():
    for width in (64, 128, 256, 512, 1024, 2048):
        assert eca_kernel_size(width) == _authors_kernel(width), width
    assert sorted(set(_eca_kernels(channel_attention("resnet18", "eca")))) == [(64, 3), (128, 5), (256, 5), (512, 5)]
    assert sorted(set(_eca_kernels(channel_attention("resnet50", "eca")))) == [
        (256, 5), (512, 5), (1024, 5), (2048, 7)]


def test_the_printed_cells_cannot_tell_the_kernel_rules_apart():
    """Adaptive, k = 3 everywhere (Code/benchmarking/eca_resnet.py) and ECA's released 3, 5, 5, 7
    (BangguWu/ECANet's eca_resnet50_k3557): the same printed #P on every ECA cell of Tables 2-4, at most 38
    parameters and 42,496 multiply-accumulates (C x k per module) apart (docs/paper.md#decisions)."""
    rules = ("adaptive", 3, (3, 5, 5, 7))
    spread_params = spread_macs = 0
    for variant in {entry.variant for name in ("table2", "table3", "table4") for entry in TABLES[name].entries
                    if entry.variant.attention.endswith("eca")}:
        counts, macs = [], []
        for rule in rules:
            ruled = Variant(variant.backbone, variant.attention, variant.integration, variant.coverage,
                            (("eca_kernel", rule),))
            with torch.device("meta"):
                counts.append(count_parameters(build_variant(ruled)))
            macs.append(sum(channels * kernel for channels, kernel in _eca_kernels(ruled)))
        assert len({round(count / UNIT, 3) for count in counts}) == 1, variant.describe()
        spread_params = max(spread_params, max(counts) - min(counts))
        spread_macs = max(spread_macs, max(macs) - min(macs))
    assert (spread_params, spread_macs) == (38, 42_496) and f"{spread_macs / 1e9:.5f}" == "0.00004"


# ----------------------------------------------------------------------------- the stem, and thop's count
def _count(variant: Variant, include_stem: bool, without_cfc: bool = True) -> int:
    with torch.device("meta"):
        model = build_variant(Variant(variant.backbone, variant.attention, variant.integration, variant.coverage,
                                      (("include_stem", include_stem),)))
    cfc = sum(module.cfc.numel() for module in model.modules() if isinstance(module, SRMExcitation))
    return count_parameters(model) - (cfc if without_cfc else 0)


def test_with_the_stem_every_emca_row_of_tables_3_and_4_prints_as_the_papers():
    """The reading of the authors' code that gives every EMCA #P (SRM's without its cfc, the SRM note's cause);
    the default misses the two R-18 EMCA-SE cells that PARAM_DIFFERENCES explains."""
    cells = {(entry.variant, entry.reference.params) for name in ("table3", "table4") for entry in TABLES[name].entries
             if entry.variant.is_emca}
    assert len({variant for variant, _ in cells}) == 36 and len(cells) == 36
    missed = {stem: sorted(variant.describe() for variant, printed in cells
                           if round(_count(variant, stem) / UNIT, 3) != printed) for stem in (False, True)}
    assert missed == {False: ["resnet18 emca_se integration=first coverage=all_stages_last",
                              "resnet18 emca_se integration=first coverage=prev_stage_all"], True: []}
    stem_note = PARAM_DIFFERENCES[1].note
    assert "every EMCA #P of Tables 3 and 4 prints as the paper's" in stem_note
    assert emca("resnet18", "se", "prev_stage_all") in {variant for variant, _ in cells}


def test_thop_counts_leaves_alone_which_gives_the_papers_srm_and_sanet_counts():
    """thop's profile counts the parameters of modules without children: SRM's cfc and SA's gating vectors,
    held by modules with children, are not among them (the SRM and SANet note)."""
    for variant, label in ((_table5("resnet50", "sa"), "SANet*"), (channel_attention("resnet50", "srm"), "SRM*"),
                           (channel_attention("resnet18", "srm"), "SRM*")):
        with torch.device("meta"):
            model = build_variant(variant)
        leaves = sum(parameter.numel() for module in model.modules() if not list(module.children())
                     for parameter in module.parameters(recurse=False))
        printed = paper.TABLE_5[(variant.backbone, label)].params
        assert round(leaves / UNIT, 3) == printed != round(count_parameters(model) / UNIT, 3), label


def test_the_bam_and_cbam_notes_figures_are_computed():
    counts = {backbone: _count(_table5(backbone, "bam"), False) for backbone in ("resnet18", "resnet50")}
    assert counts == {"resnet18": 11_712_503, "resnet50": 25_915_099}
    assert (f"{counts['resnet18'] / 1e6:.3f}", f"{counts['resnet50'] / 1e6:.2f}") == ("11.713", "25.92")
    cbam = _count(channel_attention("resnet50", "cbam"), False)
    low, high = math.ceil(26.7745 * UNIT), math.floor(26.7755 * UNIT)
    assert (cbam, low, high, cbam - high, cbam - low) == (28_089_624, 28_075_099, 28_076_146, 13_478, 14_525)
    for backbone, label in (("resnet18", "CBAM"), ("resnet34", "CBAM")):
        assert round(_count(channel_attention(backbone, "cbam"), False) / UNIT, 3) == paper.TABLE_5[(backbone,
                                                                                                      label)].params
