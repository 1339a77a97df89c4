"""The Dagster UI end to end, in headless Chromium: `dagster dev` on a free port with a temporary TULU_HOME;
the asset graph shows every stage's assets and their lineage; the curation group is materialized by
clicking "Materialize all"; the decontamination report's table and heatmap render on its asset page.

Screenshots go to $TULU_TEST_ARTIFACTS (default: the test's tmp dir). With TULU_UPDATE_SCREENSHOTS=1 the
asset-graph screenshot also replaces docs/asset-graph.png (the README's). Needs Debian's `chromium`
(`apt-get install -y chromium`) and the `playwright` package, never `playwright install`."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from ui_helpers import (
    CHROMIUM_ARGS, DagsterDev, fit_graph, graph_edges, graph_node_boxes, require_browser,
)

pytestmark = pytest.mark.integration  # dagster dev and Chromium

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LOCATION = "tulu_pipeline"
README_SCREENSHOT = REPO / "docs" / "asset-graph.png"
SERVER_TIMEOUT = 300  # s: webserver up and code location loaded, on a busy 2-core machine
RUN_TIMEOUT = 300  # s: the curation run takes about 25 s on 2 cores
UI_TIMEOUT = 60_000  # ms: any single UI state
RAW_SHOWN = ["gsm8k_train", "math_train", "gsm8k_test"]  # two training pools and one eval file


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    root = Path(os.environ.get("TULU_TEST_ARTIFACTS") or tmp_path / "artifacts")
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture
def chromium() -> str:
    return require_browser()


@pytest.fixture
def dagster_ui(chromium: str, tmp_path: Path, artifacts: Path, bundle: Path) -> Iterator[DagsterDev]:
    """A fresh instance with the raw sources materialized (CLI) and `dagster dev` serving it."""
    home = tmp_path / "home"
    env = {**os.environ, "TULU_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"),
           "TULU_DATA_DIR": str(bundle)}
    env.pop("TULU_DEPLOYMENT", None)
    subprocess.run([str(BIN / "tulu"), "instance"], cwd=REPO, env=env, check=True, capture_output=True, timeout=120)
    # The curation assets read the raw sources: materialize them first, through the CLI.
    sources = subprocess.run(
        [str(BIN / "dagster"), "asset", "materialize", "-m", "definitions", "--select", "group:sources"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert sources.returncode == 0, sources.stdout[-3000:] + sources.stderr[-3000:]
    server = DagsterDev(REPO, env, artifacts / "dagster-dev.log")
    server.start(BIN / "dagster")
    try:
        server.wait_ready(LOCATION, SERVER_TIMEOUT)
        print(f"dagster dev at {server.url} (log: {server.log_path})")
        yield server
    finally:
        server.stop()


def _asset_graph(server: DagsterDev) -> dict[str, dict]:
    """Key -> group and upstream keys, as the webserver serves them."""
    nodes = server.graphql("{ assetNodes { assetKey { path } groupName dependencyKeys { path } } }")["assetNodes"]
    return {"/".join(n["assetKey"]["path"]): {"group": n["groupName"],
                                             "deps": {"/".join(d["path"]) for d in n["dependencyKeys"]}}
            for n in nodes}


def _expected_graph() -> dict[str, dict]:
    from definitions import defs

    return {spec.key.to_user_string(): {"group": spec.group_name,
                                        "deps": {d.asset_key.to_user_string() for d in spec.deps}}
            for spec in defs.resolve_all_asset_specs()}


def _lineage_url(server: DagsterDev, groups: list[str], selection: str | None = None) -> str:
    """The global lineage page with these groups expanded (and an optional asset selection)."""
    expanded = urllib.parse.quote(",".join(f"global@global:{g}" for g in groups), safe="")
    path = "/asset-groups" + (f"~{urllib.parse.quote(selection, safe='')}/" if selection else "")
    return f"{server.url}{path}?expanded={expanded}"


@pytest.mark.slow
def test_dagster_ui_end_to_end(dagster_ui: DagsterDev, chromium: str, artifacts: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    server = dagster_ui
    expect.set_options(timeout=UI_TIMEOUT)
    shots: list[Path] = []

    # The webserver serves exactly the code location's graph (GraphQL complements the UI checks below).
    served, expected = _asset_graph(server), _expected_graph()
    assert served == expected
    groups = sorted({a["group"] for a in expected.values()})
    assert {"preference", "rlvr", "evaluation", "audit"} <= set(groups)
    # the stages drawn expanded: the recipe up to the checkpoints (evaluation is eleven partitioned assets)
    stage_groups = [g for g in groups if g not in ("sources", "evaluation")]
    stage_assets = sorted(k for k, a in expected.items() if a["group"] in stage_groups)
    assert {"sources", "curation", "models"} <= set(groups)
    assert {"normalized_prompts", "deduplicated_prompts", "decontaminated_prompts", "decontamination_report",
            "base_model"} <= set(stage_assets)

    def shot(page, name: str) -> None:
        path = artifacts / name
        page.screenshot(path=str(path), animations="disabled")  # finite transitions (dialogs) completed
        shots.append(path)
        print(f"screenshot: {path}")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        # More room for the graph: start with Dagster's left navigation collapsed (a UI preference).
        context.add_init_script("window.localStorage.setItem('dagster-nav-collapsed', 'true')")
        page = context.new_page()
        page.set_default_timeout(UI_TIMEOUT)
        # First visit: Dagster shows a "Join the Dagster community" modal; skip it whenever it is up.
        community = page.get_by_text("Join the Dagster community")
        page.add_locator_handler(community, lambda: page.get_by_role("button", name="Skip").click())
        try:
            # 1. The global lineage: one node per group (zoomed out to fit eight groups, a node shows its name;
            # the asset counts per group were checked against GraphQL above).
            page.goto(f"{server.url}/asset-groups")
            expect(page.get_by_text("Global asset lineage")).to_be_visible()
            graph = page.locator("svg:has(foreignObject)").first
            statuses_loading = page.get_by_text(re.compile("fetching statuses"))
            asset_nodes = graph.locator("foreignObject:not(.group)").filter(has_text=re.compile(r"\w"))
            for group in groups:
                node = graph.locator("foreignObject.group").filter(has=page.get_by_text(group, exact=True))
                expect(node).to_have_count(1)
            expect(community).to_be_hidden()
            expect(statuses_loading).to_have_count(0)
            shot(page, "01-global-lineage.png")

            # 2. Every stage's assets and their edges, with a few raw sources, in one expanded graph.
            selection = " or ".join([*(f"group:{g}" for g in stage_groups),
                                     *(f'key:"raw/{name}"' for name in RAW_SHOWN)])
            page.goto(_lineage_url(server, groups, selection))
            sidebar_search = page.get_by_placeholder(re.compile("Jump to"))
            expect(sidebar_search).to_be_visible()
            page.locator("button:has([aria-label=panel_show_right])").last.click()  # hide the asset tree
            expect(sidebar_search).to_be_hidden()
            shown = {**{f"raw/{n}": n for n in RAW_SHOWN}, **{k: k.split("/")[-1] for k in stage_assets}}
            expect(asset_nodes).to_have_count(len(shown))
            fit_graph(page)
            for label in shown.values():
                expect(graph.get_by_text(label, exact=True)).to_be_visible()
            boxes = graph_node_boxes(page, list(shown.values()))
            drawn = graph_edges(page, boxes)
            wanted = {(shown[up], shown[key]) for key in shown for up in expected[key]["deps"] if up in shown}
            assert {("gsm8k_train", "normalized_prompts"), ("math_train", "normalized_prompts"),
                    ("normalized_prompts", "deduplicated_prompts"),
                    ("deduplicated_prompts", "decontaminated_prompts"), ("gsm8k_test", "decontaminated_prompts"),
                    ("decontaminated_prompts", "decontamination_report")} <= wanted
            assert drawn == wanted, f"edges drawn {sorted(drawn)} != lineage {sorted(wanted)}"
            shot(page, "02-lineage.png")

            # 3. Materialize the curation group from its page: "Materialize all", then follow the run.
            page.set_viewport_size({"width": 1600, "height": 1000})
            page.goto(f"{server.url}/locations/{LOCATION}/asset-groups/curation")
            page.get_by_role("button", name=re.compile("Materialize all")).click()
            launched = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
            launchpad = page.get_by_role("dialog").get_by_role("button", name=re.compile(r"^(Launch run|Materialize)"))
            expect(launched.or_(launchpad)).to_be_visible()
            if launchpad.is_visible():  # config the UI wants confirmed: launch with the defaults shown
                launchpad.click()
                expect(launched).to_be_visible()
            short_id = re.search(r"[0-9a-f]{8}", launched.inner_text()).group()
            toast = launched.locator("xpath=ancestor::*[.//a[normalize-space()='View']][1]")  # the toast
            toast.get_by_role("link", name="View").click()
            expect(page).to_have_url(re.compile(rf"/runs/{short_id}[0-9a-f-]*"))
            run_id = page.url.rstrip("/").split("/runs/")[1].split("?")[0]
            run_status = page.get_by_text(re.compile(r"^(Queued|Not started|Starting|Started|Success|Failure)$"))
            expect(run_status.first).to_be_visible()  # the run's page has loaded
            shot(page, "03-curation-run-started.png")
            success = page.get_by_text("Success", exact=True)
            failed = page.get_by_text(re.compile(r"^(Failure|Canceled|Canceling)$"))
            expect(success.or_(failed).first).to_be_visible(timeout=RUN_TIMEOUT * 1000)
            shot(page, "04-curation-run.png")
            status = server.graphql('query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }',
                                    {"id": run_id})["runOrError"]["status"]
            assert status == "SUCCESS" and success.first.is_visible(), f"run {run_id} ended {status}"

            # 4. The decontamination report: its markdown table and heatmap, rendered from the metadata.
            page.set_viewport_size({"width": 1600, "height": 1300})  # the whole report dialog
            page.goto(f"{server.url}/assets/decontamination_report")
            metadata = page.locator("tr")
            expect(metadata.filter(has=page.get_by_text("rows_removed", exact=True))).to_contain_text(
                re.compile(r"\b[1-9]\d*\b"))
            metadata.filter(has=page.get_by_text("report", exact=True)).get_by_text("[Show Markdown]").click()
            dialog = page.get_by_role("dialog")
            expect(dialog.get_by_role("heading", name="Benchmarks")).to_be_visible()
            expect(dialog.get_by_role("heading", name=re.compile("Source × benchmark"))).to_be_visible()
            flagged = dialog.get_by_role("row").filter(
                has=page.get_by_role("cell", name="math_train", exact=True)).filter(
                has=page.get_by_role("cell", name="math", exact=True))
            expect(flagged).to_contain_text("⚠")
            expect(dialog.get_by_role("table")).to_have_count(3)
            shot(page, "05-decontamination-table.png")
            dialog.get_by_role("button", name="Close").click()
            expect(dialog).to_be_hidden()

            metadata.filter(has=page.get_by_text("heatmap", exact=True)).get_by_text("[Show Markdown]").click()
            heatmap = page.get_by_role("dialog").get_by_role("img", name="heatmap.png")
            expect(heatmap).to_be_visible()
            assert heatmap.get_attribute("src").startswith("data:image/png;base64,")
            width, height = heatmap.evaluate("img => img.decode().then(() => [img.naturalWidth, img.naturalHeight])")
            assert width > 100 and height > 100
            shot(page, "06-decontamination-heatmap.png")
            page.get_by_role("dialog").get_by_role("button", name="Close").click()

            # 5. The README's picture: the whole pipeline, stage groups expanded, raw sources as one group.
            page.set_viewport_size({"width": 1600, "height": 900})
            page.goto(_lineage_url(server, stage_groups))
            expect(sidebar_search).to_be_visible()
            page.locator("button:has([aria-label=panel_show_right])").last.click()
            expect(sidebar_search).to_be_hidden()
            expect(asset_nodes).to_have_count(len(stage_assets))
            fit_graph(page, min_size=(1600, 900))
            report_node = graph.locator("foreignObject").filter(has=page.get_by_text("decontamination_report",
                                                                                     exact=True))
            expect(report_node).to_contain_text("Materialized")
            expect(page.get_by_text("Materializing")).to_have_count(0)
            expect(statuses_loading).to_have_count(0)
            shot(page, "asset-graph.png")
        except BaseException:
            with contextlib.suppress(Exception):
                shot(page, "failure.png")
            print(server.log_tail())
            raise
        finally:
            context.close()
            browser.close()

    if os.environ.get("TULU_UPDATE_SCREENSHOTS") == "1":
        README_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(artifacts / "asset-graph.png", README_SCREENSHOT)
        print(f"updated {README_SCREENSHOT}")
    assert all(p.stat().st_size > 10_000 for p in shots)
