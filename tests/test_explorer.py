"""The explorer and the analyses behind it, end to end: a real workflow run on the tiny model over a corpus full
of HTML/JS payloads, its data files checked against the Parquets, then driven in a real headless Chromium (from
file:// and from a static web server), with `snakemake --report` on top."""

from __future__ import annotations

from collections import Counter

import functools
import http.server
import json
import os
import re
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO, SNAKEMAKE, run_snakemake, tiny_config, write_corpus
from neuron_embeddings import schemas
from neuron_embeddings.similar import link_clusters
from neuron_embeddings.storage import check_schema, load_tensors
from neuron_embeddings.tables import selected_entries

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = REPO / "test-artifacts"
# Each would set window.__xss or change the title if the page ever ran it.
PAYLOADS = [
    '<script>window.__xss = "script"; document.title = "pwned"</script>',
    '<img src=x onerror="window.__xss=\'img\'; document.title=\'pwned\'">',
    '"><svg onload="window.__xss=\'svg\'"></svg> \' " & &amp; &lt;',
    "</div></span><b id=injected>bold?</b><iframe src=javascript:window.__xss=1></iframe>",
    "</script><script>window.__xss='breakout'</script>\u2028\u2029",
]
SETTINGS = {
    "explorer": {"examples_per_cluster": 4, "max_clusters": 5, "context_before": 6, "context_after": 3,
                 "block_size": 16, "featured": 3, "search_hits": 20},
    "analyses": {"importance": {"neurons": 3, "examples_per_cluster": 2, "batch_size": 16},
                 "similar": {"top_k": 5, "min_similarity": 0.3, "backend": "faiss"},
                 "sweep": {"thresholds": [0.1, 0.3, 0.5]}},
}


@pytest.fixture(scope="module")
def explorer_run(tiny_llama, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("explorer")
    corpus = write_corpus(workdir / "corpus", repeats=2)
    for i, text in enumerate(PAYLOADS * 3):
        (corpus / f"payload{i:03d}.txt").write_text(text)
    (corpus / '<img src=x onerror="window.__xss=1">.txt').write_text(PAYLOADS[1])  # file names are shown too
    config = tiny_config(tiny_llama, corpus, run="explorer", **SETTINGS)
    config["corpus"].update(window_tokens=32, max_tokens=3000)
    config["selection"].update(context_before=8, context_after=4)
    run_snakemake(workdir, config)
    return workdir, config, workdir / "results" / "explorer"


def read_data(path: Path) -> tuple[str, dict]:
    text = path.read_text(encoding="ascii")
    match = re.fullmatch(r'NE\.register\(("[^"]*"),(.*)\);\n', text, re.S)
    assert match, f"{path} is not one registration call"
    return json.loads(match.group(1)), json.loads(match.group(2))


def layer_tables(run: Path, layer: int) -> dict:
    return {name: pq.read_table(run / f"{name}/layer-{layer}.parquet") for name in ("clusters", "metrics", "importance", "similar", "sweep")} | {
        "embeddings": pq.read_table(run / f"embeddings/layer-{layer}.parquet", columns=[
            "neuron", "example_rank", "token", "activation", "context_tokens", "context_center"])}


def test_analyses_outputs(explorer_run):
    _, config, run = explorer_run
    for layer in config["layers"]:
        t = layer_tables(run, layer)
        for name, schema in (("importance", schemas.IMPORTANCE), ("similar", schemas.SIMILAR), ("sweep", schemas.SWEEP)):
            check_schema(t[name].schema, schema, name)
        # Importance: the recomputed unmasked activation is the cached one; one value per context token up to the
        # max token; in [0, 1]; the max token itself 1 wherever padding it lowered the activation.
        emb = {(n, r): (a, c) for n, r, a, c in zip(*(t["embeddings"].column(k).to_pylist() for k in ("neuron", "example_rank", "activation", "context_center")))}
        imp = t["importance"].to_pylist()
        assert imp, "some examples have token importance"
        assert len({row["neuron"] for row in imp}) == 2 * 3  # the 3 most and 3 least polysemantic
        for row in imp:
            activation, center = emb[(row["neuron"], row["example_rank"])]
            assert row["activation"] == pytest.approx(activation, rel=1e-4, abs=1e-6)
            assert len(row["importance"]) == len(row["masked_activations"]) == center + 1
            assert all(0.0 <= v <= 1.0 for v in row["importance"])
            if row["masked_activations"][-1] < row["activation"]:
                assert row["importance"][-1] == pytest.approx(1.0)
        # Similar: other neurons only, above the threshold, at most top_k per cluster.
        sim = t["similar"]
        assert sim.num_rows > 0
        assert not np.any(sim.column("neuron").to_numpy() == sim.column("other_neuron").to_numpy())
        assert sim.column("similarity").to_numpy().min() >= 0.3 - 1e-6
        assert sim.column("rank").to_numpy().max() < 5
        # ...and exactly the links of the central examples' x, as the selection file holds them.
        state, meta = load_tensors(run / f"selection/layer-{layer}.safetensors")
        x = selected_entries(state, meta["settings"]["mode"], meta["cache_settings"].get("sign", "positive"))["x"]
        central = t["clusters"].filter(t["clusters"].column("is_central"))
        distinct, rows = np.unique(x[t["clusters"].column("is_central").to_numpy(zero_copy_only=False)], axis=0, return_inverse=True)
        links = link_clusters(rows.reshape(-1), distinct, central.column("neuron").to_numpy(), central.column("cluster").to_numpy(), 5, 0.3, "sklearn")
        assert links["other_neuron"].tolist() == sim.column("other_neuron").to_pylist()
        assert links["other_cluster"].tolist() == sim.column("other_cluster").to_pylist()
        # Sweep: every neuron at every threshold; the configured threshold reproduces the clustering.
        sweep = t["sweep"]
        assert sweep.num_rows == 48 * 3
        threshold = config["clustering"]["threshold"]["per_layer"].get(str(layer), config["clustering"]["threshold"]["default"])
        if threshold in (0.1, 0.3, 0.5):
            at = sweep.filter(pa.array(np.isclose(sweep.column("threshold").to_numpy(), threshold))).column("n_clusters").to_pylist()
            assert at == t["metrics"].column("n_clusters").to_pylist()
    assert (run / "report/layer-0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (run / "report/summary.tsv").read_text().splitlines()
    assert rows[0].startswith("layer\tneurons") and len(rows) == 1 + len(config["layers"])


def test_explorer_data_files_are_sharded_escaped_and_match_the_tables(explorer_run):
    _, config, run = explorer_run
    explorer = run / "explorer"
    for name in ("index.html", "explorer.js", "explorer.css", "data/index.js"):
        assert (explorer / name).is_file()
    key, index = read_data(explorer / "data/index.js")
    assert key == "index" and index["layers"] == config["layers"]
    for path in (explorer / "data").rglob("*.js"):
        text = path.read_text(encoding="ascii")
        assert "<" not in text and ">" not in text and "&" not in text, f"{path}: markup characters must be escaped"
    for layer in config["layers"]:
        t = layer_tables(run, layer)
        blocks = sorted((explorer / f"data/layer-{layer}").glob("block-*.js"))
        assert len(blocks) == 3  # 48 neurons in blocks of 16
        shown = {}
        for path in blocks:
            key, block = read_data(path)
            assert key == f"layer-{layer}/{path.stem}"
            for neuron, data in block["neurons"].items():
                assert int(neuron) // 16 == int(path.stem.split("-")[1])
                shown[int(neuron)] = (block, data)
        assert set(shown) == set(range(48))
        metrics = {r["neuron"]: r for r in t["metrics"].to_pylist()}
        clusters = t["clusters"].to_pylist()
        tokens = t["embeddings"].column("context_tokens").to_pylist()
        centers = t["embeddings"].column("context_center").to_pylist()
        for neuron, (block, data) in shown.items():
            assert data["n_clusters"] == metrics[neuron]["n_clusters"]
            assert len(data["clusters"]) == min(5, data["n_clusters"])
            for k, cluster in enumerate(data["clusters"]):
                rows = [i for i, c in enumerate(clusters) if c["neuron"] == neuron and c["cluster"] == k]
                assert cluster["size"] == len(rows)
                assert len(cluster["examples"]) == min(4, len(rows))
                central = next(i for i in rows if clusters[i]["is_central"])
                first = cluster["examples"][0]
                assert first["r"] == clusters[central]["example_rank"]  # central example first
                c = centers[central]
                want = tokens[central][max(0, c - 6) : c + 4]
                assert [block["vocab"][j] for j in first["t"]] == want  # the text, unchanged
                assert want[first["c"]] == tokens[central][c]  # centred on the max token


# ---------- the browser ----------

@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run tests/setup/system-packages.sh (Debian's chromium, chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_rendered(driver, expected_hash: str | None = None, timeout: float = 15):
    from selenium.webdriver.support.ui import WebDriverWait

    def done(d):
        rendered = d.find_element("id", "app").get_attribute("data-rendered")
        status = d.find_element("id", "status")
        if "error" in (status.get_attribute("class") or ""):
            raise AssertionError(f"explorer error: {status.text}")
        if expected_hash is None:
            return rendered and rendered == d.execute_script("return location.hash")
        return rendered == expected_hash

    WebDriverWait(driver, timeout).until(done)


def visible_text(token: str) -> str:
    return token.replace("\r", "\u240d").replace("\n", "\u21b5").replace("\t", "\u2192")


def no_script_ran(driver) -> None:
    assert driver.execute_script("return typeof window.__xss") == "undefined"
    assert driver.execute_script("return typeof window.pwned") == "undefined"  # conftest's own <script> text
    assert "pwned" not in driver.title
    assert driver.find_elements("id", "injected") == []
    assert driver.execute_script("return document.querySelectorAll('#app img, #app script, #app iframe, .ex svg, .ex b').length") == 0


def pick_neuron(run: Path, layer: int) -> tuple[int, int]:
    """A neuron with two or more clusters, token importance and a similar-feature link, and that link's cluster."""
    imp = set(pq.read_table(run / f"importance/layer-{layer}.parquet").column("neuron").to_pylist())
    metrics = pq.read_table(run / f"metrics/layer-{layer}.parquet").to_pylist()
    similar = pq.read_table(run / f"similar/layer-{layer}.parquet").to_pylist()
    for m in sorted(metrics, key=lambda m: -m["n_clusters"]):
        links = [s for s in similar if s["neuron"] == m["neuron"] and s["cluster"] < 5]
        if m["n_clusters"] >= 2 and m["neuron"] in imp and links:
            return m["neuron"], links[0]["cluster"]
    raise AssertionError("no neuron with clusters, importance and links in the tiny run")


def test_browser_navigates_switches_tabs_and_colours_and_follows_links(explorer_run, browser):
    from selenium.webdriver.support.ui import Select

    _, config, run = explorer_run
    d = browser
    layer = config["layers"][-1]
    neuron, linked_cluster = pick_neuron(run, layer)
    d.get((run / "explorer/index.html").as_uri())
    wait_rendered(d)
    featured = read_data(run / f"explorer/data/layer-{config['layers'][0]}/neurons.js")[1]["featured"]["most"]
    assert d.execute_script("return location.hash") == f"#layer={config['layers'][0]}&neuron={featured[0]}"

    # pick the layer, type the neuron
    Select(d.find_element("id", "layer")).select_by_value(str(layer))
    wait_rendered(d)
    box = d.find_element("id", "neuron")
    box.clear()
    box.send_keys(str(neuron))
    d.find_element("id", "go").click()
    wait_rendered(d, f"#layer={layer}&neuron={neuron}")
    assert d.find_element("id", "neuron-title").text == f"Layer {layer} · neuron {neuron}"
    n_clusters = next(m for m in pq.read_table(run / f"metrics/layer-{layer}.parquet").to_pylist() if m["neuron"] == neuron)["n_clusters"]
    tabs = d.find_elements("css selector", "#tabs .tab")
    assert len(tabs) == min(5, n_clusters)
    assert tabs[0].get_attribute("aria-selected") == "true"

    # switch to another cluster tab: its central example, as the Parquet has it
    tabs[1].click()
    wait_rendered(d, f"#layer={layer}&neuron={neuron}&cluster=1")
    rows = d.find_elements("css selector", "#examples .ex")
    clusters = [c for c in pq.read_table(run / f"clusters/layer-{layer}.parquet").to_pylist() if c["neuron"] == neuron and c["cluster"] == 1]
    assert len(rows) == min(4, len(clusters))
    central = next(c for c in clusters if c["is_central"])
    emb = next(e for e in pq.read_table(run / f"embeddings/layer-{layer}.parquet", columns=["neuron", "example_rank", "context_tokens", "context_center"]).to_pylist()
               if e["neuron"] == neuron and e["example_rank"] == central["example_rank"])
    c = emb["context_center"]
    want = emb["context_tokens"][max(0, c - 6) : c + 4]
    spans = rows[0].find_elements("css selector", ".tok")
    assert [s.get_attribute("textContent") for s in spans] == [visible_text(t) for t in want]
    assert rows[0].get_attribute("data-rank") == str(central["example_rank"])
    max_token = rows[0].find_element("css selector", ".tok.max")
    assert "activation" in max_token.get_attribute("title")
    assert max_token.get_attribute("textContent") == visible_text(emb["context_tokens"][c])

    # colour by token importance: the central example has it, its max token fully green
    d.find_element("id", "importance").click()
    wait_rendered(d, f"#layer={layer}&neuron={neuron}&cluster=1&color=importance")
    first = d.find_elements("css selector", "#examples .ex")[0]
    assert "has-importance" in first.get_attribute("class")
    max_token = first.find_element("css selector", ".tok.max")
    assert max_token.get_attribute("data-imp") in ("1", "0")  # 0 only where no padding lowered the activation
    colours = [s.value_of_css_property("background-color") for s in first.find_elements("css selector", ".tok[data-imp]")]
    assert colours and all(col.startswith("rgba(30, 160, 70") for col in colours)
    ARTIFACTS.mkdir(exist_ok=True)
    d.save_screenshot(str(ARTIFACTS / "explorer-importance.png"))

    # a similar feature of another neuron, then back
    d.find_element("css selector", "#tabs .tab[data-cluster='%d']" % linked_cluster).click()
    wait_rendered(d)
    before = d.execute_script("return location.hash")
    link = d.find_elements("css selector", "#similar a.similar-link")[0]
    target = link.get_attribute("href").split("#", 1)[1]
    other = int(re.search(r"neuron=(\d+)", target).group(1))
    assert other != neuron
    link.click()
    wait_rendered(d, "#" + target)
    assert d.find_element("id", "neuron-title").text == f"Layer {layer} · neuron {other}"
    d.back()
    wait_rendered(d, before)
    assert d.find_element("id", "neuron-title").text == f"Layer {layer} · neuron {neuron}"

    # a random neuron, and the search by token
    d.find_element("id", "random").click()
    wait_rendered(d)
    assert re.search(r"Layer \d+ · neuron \d+", d.find_element("id", "neuron-title").text)
    token = pq.read_table(run / f"embeddings/layer-{layer}.parquet", columns=["neuron", "token"]).to_pylist()
    # the word most examples peak on (which words those are depends on the selection, e.g. its sign)
    words = Counter(e["token"].strip() for e in token if e["token"].strip().isalpha() and len(e["token"].strip()) >= 3)
    word = min(words, key=lambda w: (-words[w], w))
    peaking = {e["neuron"] for e in token if e["token"].strip().lower() == word.lower()}
    search = d.find_element("id", "search")
    search.clear()
    search.send_keys(word)
    d.find_element("id", "search-go").click()
    wait_rendered(d)
    found = {int(re.search(r"neuron=(\d+)", a.get_attribute("href")).group(1)) for a in d.find_elements("css selector", "#search-results a")}
    assert peaking and peaking <= found
    d.save_screenshot(str(ARTIFACTS / "explorer.png"))
    severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
    no_script_ran(d)


def test_xss_payloads_render_as_text_and_run_nothing(explorer_run, browser):
    _, config, run = explorer_run
    d = browser
    base = (run / "explorer/index.html").as_uri()
    visited = 0
    for layer in config["layers"]:
        emb = pq.read_table(run / f"embeddings/layer-{layer}.parquet", columns=["neuron", "example_rank", "context_tokens", "context_center"]).to_pylist()
        clusters = pq.read_table(run / f"clusters/layer-{layer}.parquet").to_pylist()
        for e, c in zip(emb, clusters):
            lo, hi = max(0, e["context_center"] - 6), e["context_center"] + 4
            text = "".join(e["context_tokens"][lo:hi])
            if not (c["is_central"] and c["cluster"] < 5 and re.search(r"<|onerror|script", text)):
                continue
            d.get(f"{base}#layer={layer}&neuron={e['neuron']}&cluster={c['cluster']}")
            wait_rendered(d)
            row = d.find_element("css selector", f"#examples .ex[data-rank='{e['example_rank']}']")
            shown = "".join(s.get_attribute("textContent") for s in row.find_elements("css selector", ".tok"))
            assert shown == visible_text(text)  # the payload, as text
            no_script_ran(d)
            visited += 1
            if visited >= 6:
                break
    assert visited >= 3, "the payload corpus should put payload text into some examples"
    # The search box and the hash are input too.
    d.get(base + "#layer=0&neuron=0&q=" + "%3Cimg%20src%3Dx%20onerror%3D%22window.__xss%3D1%22%3E")
    wait_rendered(d)
    assert "<img src=x onerror=" in d.find_element("id", "search-results").text
    d.find_element("id", "search").send_keys("<script>")
    d.find_element("id", "search-go").click()
    wait_rendered(d)
    no_script_ran(d)
    ARTIFACTS.mkdir(exist_ok=True)
    d.save_screenshot(str(ARTIFACTS / "explorer-xss.png"))


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_explorer_works_behind_a_static_web_server(explorer_run, browser):
    _, config, run = explorer_run
    handler = functools.partial(QuietHandler, directory=str(run / "explorer"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        layer = config["layers"][0]
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/index.html#layer={layer}&neuron=5")
        wait_rendered(browser, f"#layer={layer}&neuron=5")
        assert browser.find_element("id", "neuron-title").text == f"Layer {layer} · neuron 5"
        assert browser.find_elements("css selector", "#examples .ex")
        assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        server.shutdown()
        server.server_close()


def test_snakemake_report_has_the_plots_and_links_the_explorer(explorer_run):
    workdir, config, run = explorer_run
    cmd = [*SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "1", "--report", "report.html"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = (workdir / "report.html").read_text()
    assert "results/explorer/explorer/index.html" in page
    for name in ("layer-0.png", "layer-2.png", "summary.tsv", "index.html"):
        assert name in page


def test_histogram_edges_are_the_cached_histograms_edges():
    # the explorer computes them with numpy (it does not import torch); they must be topk's, as the page shows them
    from neuron_embeddings.explorer import _hist_edges
    from neuron_embeddings.topk import HIST_EDGES

    assert _hist_edges() == [float(f"{v:.6g}") for v in HIST_EDGES.tolist()]


def test_helpers_of_the_explorer_blocks():
    from neuron_embeddings.explorer import row_peaks, spread

    assert spread(np.array([5, 0, 9]), np.array([2, 0, 3])).tolist() == [5, 6, 9, 10, 11]
    values = np.array([1.0, -3.0, np.nan, 2.0, np.nan], np.float32)
    peaks = row_peaks(values, np.array([0, 2, 2, 4, 5]))
    assert peaks[0] == 3.0 and np.isnan(peaks[1]) and peaks[2] == 2.0 and np.isnan(peaks[3])
