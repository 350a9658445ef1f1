"""End to end in a real browser: the notebooks run in JupyterLab, and the widgets render and react.

Why: executing notebooks headless (test_notebooks.py) proves the Python side; only a browser shows
that the widgets actually display ("Error displaying widget" is a front-end failure), that the slider
and buttons reach the kernel, and what a reader sees (the explorer's screenshot doubles as the docs' image).
Debian's Chromium, driven by Playwright; skipped with the reason when either is missing.
"""
from __future__ import annotations

import re
import time

import pytest

from browser_support import missing_requirements, open_and_run_all, save_screenshot, start_lab

pytestmark = [pytest.mark.browser, pytest.mark.integration]

_missing = missing_requirements()
if _missing:
    pytest.skip(_missing, allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from browser_support import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

WIDGET_TIMEOUT = 60_000  # ms: a kernel round trip on a busy 2-core machine


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    server = start_lab(tmp_path_factory.mktemp("lab"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, lab):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1800})
    pg = ctx.new_page()
    pg.set_default_timeout(WIDGET_TIMEOUT)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.errors = errors
    yield pg
    ctx.close()
    lab.shutdown_kernels()


def assert_clean_outputs(page) -> None:
    expect(page.get_by_text("Error displaying widget")).to_have_count(0)
    expect(page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")).to_have_count(0)
    expect(page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")).to_have_count(0)


def tidy(page) -> None:
    """Room for the widgets: no file browser, no code (screenshots show what a reader uses)."""
    page.evaluate("window.jupyterapp.shell.collapseLeft()")
    page.evaluate("window.jupyterapp.commands.execute('notebook:hide-all-cell-code')")


def step_of(label) -> int:
    """The step number the step label shows."""
    m = re.search(r"step (\d+)", label.inner_text())
    assert m, label.inner_text()
    return int(m.group(1))


def test_step_through_notebook(page, lab, timing):
    ran = open_and_run_all(page, lab, "01_step_through.ipynb")
    print(f"\n[timing] 01_step_through run-all in the browser: {ran:.1f}s")
    assert_clean_outputs(page)
    tidy(page)

    # ---- dl.show: the slider and the tokens pick the step shown ----------------------------------
    view = page.locator(".dl-trace-view").first
    expect(view).to_be_visible()
    label, tokens = view.locator(".dl-step-label"), view.locator(".dl-token")
    dist = view.locator(".dl-distribution")
    expect(dist).to_be_visible()
    expect(view.locator(".dl-lens")).to_be_visible()
    expect(view.locator(".dl-attention")).to_be_visible()
    assert tokens.count() > 10
    start = step_of(label)
    before = dist.inner_html()
    handle = view.locator(".dl-step-slider").get_by_role("slider")
    handle.focus()
    t0 = time.perf_counter()
    handle.press("ArrowRight")
    expect(label).to_contain_text(f"step {start + 1} ")  # the label is the last thing a move updates
    expect(dist).to_contain_text(f"step {start + 1} ")
    timing("browser: slider move, key press to updated page (show, 01_step_through)", time.perf_counter() - t0)
    assert dist.inner_html() != before
    selected = view.locator(".dl-token.dl-selected")
    expect(selected).to_have_count(1)
    expect(label.locator("code")).to_have_text(selected.inner_text().strip())  # the label names that step's token
    expect(dist).to_be_visible()

    tokens.nth(2).click()
    expect(label).to_contain_text("step 2 ")
    expect(handle).to_have_attribute("aria-valuenow", re.compile(r"^2(\.0)?$"))
    save_screenshot(view, "show_view.png")

    # ---- dl.explore: next token, force a candidate, fork -------------------------------------------
    explorer = page.locator(".dl-explorer")
    expect(explorer).to_have_count(1)
    ex_label, ex_tokens = explorer.locator(".dl-step-label"), explorer.locator(".dl-token")
    status = explorer.locator(".dl-status")
    n0 = ex_tokens.count()
    assert n0 == 8, n0
    expect(ex_label).to_contain_text(f"step {n0 - 1} ")

    t0 = time.perf_counter()
    explorer.locator(".dl-next").click()
    expect(status).to_contain_text("decoded")  # the last thing an action updates
    timing("browser: next token, click to updated page (explore, 01_step_through)", time.perf_counter() - t0)
    expect(ex_tokens).to_have_count(n0 + 1)
    expect(ex_label).to_contain_text(f"step {n0} ")

    candidate = explorer.locator(".dl-candidate").nth(1)
    wanted = candidate.inner_text().rsplit(maxsplit=1)[0].strip()  # "␣brave  0.12" -> "␣brave"
    candidate.click()
    expect(ex_tokens).to_have_count(n0 + 2)
    expect(ex_label).to_contain_text(f"step {n0 + 1} ")
    expect(ex_label).to_contain_text("forced")
    expect(ex_label.locator("code")).to_have_text(wanted)
    expect(status).to_contain_text("forced")
    expect(ex_tokens.last).to_have_text(wanted)

    explorer.locator(".dl-fork").click()
    expect(status).to_contain_text("forked")
    expect(explorer.locator(".dl-branches select option")).to_have_count(2)
    explorer.locator(".dl-next").click()
    expect(ex_tokens).to_have_count(n0 + 3)
    expect(status).to_contain_text("decoded")  # the last thing an action updates
    expect(explorer.locator(".dl-next")).to_be_enabled()
    assert_clean_outputs(page)
    save_screenshot(explorer, "explorer.png", docs_name="explorer.png")
    assert not page.errors, page.errors


def test_attention_and_lens_notebook(page, lab):
    ran = open_and_run_all(page, lab, "03_attention_and_lens.ipynb")
    print(f"\n[timing] 03_attention_and_lens run-all in the browser: {ran:.1f}s")
    assert_clean_outputs(page)
    tidy(page)
    view = page.locator(".dl-trace-view").last
    expect(view.locator(".dl-step-label")).to_contain_text("Paris")
    att = view.locator(".dl-attention")
    expect(att).to_contain_text("every layer, mean of heads")
    view.locator(".dl-layer select").select_option(label="29")
    expect(att).to_contain_text("layer 29, mean of heads")
    view.locator(".dl-head select").select_option(label="every head")
    expect(att).to_contain_text("head 8")  # one line per head
    expect(view.locator(".dl-lens")).to_contain_text("what each layer would say")
    save_screenshot(view, "attention_lens.png")  # the docs draw this figure with tools/doc_images.py
    assert not page.errors, page.errors


@pytest.mark.parametrize("notebook", ["05_compare_strategies.ipynb"])  # the id lets `-k 05` pick it
def test_compare_notebook(page, lab, notebook):
    ran = open_and_run_all(page, lab, notebook)
    print(f"\n[timing] {notebook} run-all in the browser: {ran:.1f}s")
    assert_clean_outputs(page)
    tidy(page)
    outputs = page.locator(".jp-OutputArea-output")
    # the tables beside the paper, and the agreement text the notebook writes from its own numbers
    expect(outputs.filter(has_text="closest in Table 1")).to_have_count(1)
    expect(outputs.filter(has_text="direction agrees?")).to_have_count(1)
    words = page.locator(".jp-OutputArea-output[data-mime-type='text/markdown']")
    expect(words).to_have_count(1)
    expect(words).to_contain_text("the direction agrees with the paper for")
    expect(words.locator("li")).to_have_count(6)  # two metrics, three headlines, the resolution
    expect(page.locator(".jp-OutputArea-output[data-mime-type='image/png']")).to_have_count(2)  # compare, divergence
    # one run's view opens at the step where greedy and nucleus part, as the notebook printed it
    said = outputs.filter(has_text="greedy and nucleus 0.9 (seed 0) part at step").first.inner_text()
    step = int(re.search(r"part at step (\d+)", said).group(1))
    view = page.locator(".dl-trace-view").last
    expect(view.locator(".dl-step-label")).to_contain_text(f"step {step} ")
    expect(view.locator(".dl-distribution")).to_contain_text(f"step {step} ")
    save_screenshot(outputs.filter(has_text="closest in Table 1"), "compare_table.png")
    # dl.show(cmp): one line per strategy (nine, seed 0 shown first); a click selects that step in every run
    cmp_view = page.locator(".dl-cmp-view")
    expect(cmp_view).to_have_count(1)
    lines = cmp_view.locator(".dl-cmp-tokens")
    expect(lines).to_have_count(9)
    lines.first.locator("button[value='3']").click()
    expect(cmp_view.locator(".dl-cmp-selected")).to_contain_text("step 3")
    save_screenshot(cmp_view, "compare_view.png")
    assert_clean_outputs(page)
    assert not page.errors, page.errors


@pytest.mark.parametrize("notebook", ["02_distributions.ipynb", "04_custom_decoder.ipynb", "06_api_models.ipynb"])
def test_other_notebooks_render(page, lab, notebook):
    ran = open_and_run_all(page, lab, notebook)
    print(f"\n[timing] {notebook} run-all in the browser: {ran:.1f}s")
    expect(page.get_by_text("Error displaying widget")).to_have_count(0)
    expect(page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")).to_have_count(0)
    # 04 runs the blog post's loading cell unchanged, and transformers warns on stderr about its torch_dtype=
    stderr = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    assert all("Traceback" not in text for text in stderr.all_inner_texts())
    view = page.locator(".dl-trace-view").last
    expect(view.locator(".dl-distribution")).to_be_visible()
    expect(view.locator(".dl-step-label")).to_contain_text("step ")
    assert not page.errors, page.errors
