// The neuron explorer: a static page over the data files in data/ (see neuron_embeddings/explorer.py).
// Data files are scripts calling NE.register(key, object); they load on demand through <script src>, which
// works from file:// where fetch() does not. Every piece of corpus text reaches the page through textContent
// or a DOM property (title), never as markup. The state lives in location.hash, so back/forward and links work.
(function () {
  "use strict";

  const registry = Object.create(null);
  const pending = Object.create(null);
  window.NE = Object.freeze({
    register: function (key, data) { registry[key] = data; },
  });

  function load(key) {
    if (registry[key]) return Promise.resolve(registry[key]);
    if (!pending[key]) {
      pending[key] = new Promise(function (resolve, reject) {
        const script = document.createElement("script");
        script.src = "data/" + key + ".js";  // keys are built from integers and fixed words only
        script.onload = function () {
          if (registry[key]) resolve(registry[key]);
          else reject(new Error("data file " + script.src + " registered nothing"));
        };
        script.onerror = function () {
          delete pending[key];
          reject(new Error("could not load " + script.src));
        };
        document.head.appendChild(script);
      });
    }
    return pending[key];
  }

  // ---- small DOM helpers: text only ----
  function el(tag, props, children) {
    const node = document.createElement(tag);
    if (props) {
      for (const name of Object.keys(props)) {
        if (name === "text") node.textContent = props[name];
        else if (name === "class") node.className = props[name];
        else if (name === "dataset") Object.assign(node.dataset, props[name]);
        else if (name === "attrs") for (const a of Object.keys(props[name])) node.setAttribute(a, props[name][a]);
        else node[name] = props[name];
      }
    }
    for (const child of children || []) if (child !== null && child !== undefined) node.append(child);
    return node;
  }
  const SVG = "http://www.w3.org/2000/svg";
  function svgEl(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const a of Object.keys(attrs || {})) node.setAttribute(a, String(attrs[a]));
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }
  function visible(token) { return String(token).replace(/\r/g, "\u240d").replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192"); }
  function fmt(value, digits) {
    if (value === null || value === undefined || Number.isNaN(value)) return "\u2013";
    return typeof value === "number" ? (Number.isInteger(value) ? String(value) : value.toFixed(digits === undefined ? 3 : digits)) : String(value);
  }
  function pad4(n) { return String(n).padStart(4, "0"); }
  function short(v) {
    if (v === 0) return "0";
    const a = Math.abs(v);
    return a >= 1000 || a < 0.01 ? v.toExponential(0).replace("e+", "e") : String(Number(v.toPrecision(2)));
  }

  // ---- state in the hash ----
  function parseHash() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    function int(name) {
      const v = params.get(name);
      return v !== null && /^\d{1,9}$/.test(v) ? parseInt(v, 10) : null;
    }
    return {
      layer: int("layer"), neuron: int("neuron"), cluster: int("cluster") || 0,
      color: params.get("color") === "importance" ? "importance" : "activation",
      q: (params.get("q") || "").slice(0, 200),
    };
  }
  function hashFor(state) {
    const params = new URLSearchParams();
    params.set("layer", String(state.layer));
    params.set("neuron", String(state.neuron));
    if (state.cluster) params.set("cluster", String(state.cluster));
    if (state.color === "importance") params.set("color", "importance");
    if (state.q) params.set("q", state.q);
    return "#" + params.toString();
  }
  function linkFor(layer, neuron, cluster) {
    const s = Object.assign({}, current, { layer: layer, neuron: neuron, cluster: cluster || 0, q: "" });
    return hashFor(s);
  }
  function go(changes) {
    const next = hashFor(Object.assign({}, current, changes));
    if (next !== location.hash) location.hash = next;  // a history entry; hashchange renders
    else render();
  }

  let index = null;
  let current = null;
  let ticket = 0;
  const $ = function (id) { return document.getElementById(id); };

  // ---- charts (SVG built node by node) ----
  function barChart(caption, labels, counts, options) {
    options = options || {};
    const width = options.width || 330, height = 150, left = 34, bottom = 28, top = 8;
    const svg = svgEl("svg", { class: "chart", width: width, height: height, viewBox: "0 0 " + width + " " + height, role: "img" });
    svg.append(svgEl("title", {}, caption));
    const maxCount = Math.max(1, ...counts);
    const n = Math.max(1, counts.length);
    const step = (width - left - 6) / n;
    counts.forEach(function (count, i) {
      const h = (height - bottom - top) * count / maxCount;
      const bar = svgEl("rect", { class: "bar" + (options.highlight === i ? " hl" : ""), x: left + i * step + 0.5,
        y: height - bottom - h, width: Math.max(1, step - 1), height: h });
      bar.append(svgEl("title", {}, labels[i] + ": " + count));
      svg.append(bar);
    });
    svg.append(svgEl("line", { x1: left, y1: height - bottom, x2: width - 4, y2: height - bottom, stroke: "#888" }));
    svg.append(svgEl("text", { x: left - 4, y: top + 8, "text-anchor": "end" }, String(maxCount)));
    svg.append(svgEl("text", { x: left - 4, y: height - bottom, "text-anchor": "end" }, "0"));
    const every = Math.max(1, Math.ceil(n / 8));
    labels.forEach(function (label, i) {
      if (i % every === 0) {
        svg.append(svgEl("text", { x: left + (i + 0.5) * step, y: height - bottom + 12, "text-anchor": "middle" }, options.tick ? options.tick(i) : label));
      }
    });
    if (options.xlabel) svg.append(svgEl("text", { x: (width + left) / 2, y: height - 3, "text-anchor": "middle" }, options.xlabel));
    return el("figure", { class: "chart" }, [svg, el("figcaption", { text: caption })]);
  }

  function sweepChart(caption, sweep, threshold, own) {
    const width = 330, height = 150, left = 34, bottom = 28, top = 8, right = 8;
    const svg = svgEl("svg", { class: "chart", width: width, height: height, viewBox: "0 0 " + width + " " + height, role: "img" });
    svg.append(svgEl("title", {}, caption));
    const xs = sweep.threshold;
    if (!xs.length) return el("figure", { class: "chart" }, [svg, el("figcaption", { text: caption })]);
    const ymax = Math.max(1, ...sweep.p90, ...(own || [])) * 1.05;
    const x0 = Math.min(...xs, threshold === null ? xs[0] : threshold), x1 = Math.max(...xs, threshold === null ? xs[0] : threshold);
    const X = function (v) { return left + (width - left - right) * (x1 === x0 ? 0.5 : (v - x0) / (x1 - x0)); };
    const Y = function (v) { return height - bottom - (height - bottom - top) * v / ymax; };
    const band = xs.map(function (x, i) { return X(x) + "," + Y(sweep.p90[i]); })
      .concat(xs.slice().reverse().map(function (x, j) { return X(x) + "," + Y(sweep.p10[xs.length - 1 - j]); }));
    svg.append(svgEl("polygon", { points: band.join(" "), fill: "rgba(85,168,104,0.25)" }));
    function line(values, color, dash, label) {
      const poly = svgEl("polyline", { points: xs.map(function (x, i) { return X(x) + "," + Y(values[i]); }).join(" "),
        fill: "none", stroke: color, "stroke-width": 2, "stroke-dasharray": dash || "" });
      poly.append(svgEl("title", {}, label));
      svg.append(poly);
      values.forEach(function (v, i) {
        const dot = svgEl("circle", { cx: X(xs[i]), cy: Y(v), r: 2.5, fill: color });
        dot.append(svgEl("title", {}, label + " at " + xs[i] + ": " + fmt(v, 2)));
        svg.append(dot);
      });
    }
    line(sweep.mean, "#2e8b57", "", "mean clusters per neuron");
    if (own) line(own, "#d1495b", "4 2", "this neuron");
    if (threshold !== null && threshold !== undefined) {
      svg.append(svgEl("line", { x1: X(threshold), x2: X(threshold), y1: top, y2: height - bottom, stroke: "#c44e52", "stroke-dasharray": "2 2" }));
    }
    svg.append(svgEl("line", { x1: left, y1: height - bottom, x2: width - right, y2: height - bottom, stroke: "#888" }));
    svg.append(svgEl("text", { x: left - 4, y: top + 8, "text-anchor": "end" }, fmt(ymax, 1)));
    xs.forEach(function (x) { svg.append(svgEl("text", { x: X(x), y: height - bottom + 12, "text-anchor": "middle" }, String(x))); });
    svg.append(svgEl("text", { x: (width + left) / 2, y: height - 3, "text-anchor": "middle" }, "similarity threshold"));
    return el("figure", { class: "chart" }, [svg, el("figcaption", { text: caption })]);
  }

  // ---- token colouring ----
  function colour(value, scale, mode) {
    if (value === null || value === undefined) return "";
    if (mode === "importance") return "rgba(30,160,70," + Math.min(1, Math.max(0, value)).toFixed(3) + ")";
    const a = Math.min(1, Math.abs(value) / (scale || 1));
    return value >= 0 ? "rgba(255,128,0," + a.toFixed(3) + ")" : "rgba(40,110,255," + a.toFixed(3) + ")";
  }

  function exampleRow(example, block, neuronData, mode, central) {
    const hasImportance = Array.isArray(example.i);
    // Two halves meeting at the max token, which starts the second: every row's max token in one column.
    const parts = { before: el("span", { class: "before" }), after: el("span", { class: "after" }) };
    example.t.forEach(function (id, j) {
      const token = block.vocab[id];
      const act = example.v[j];
      const imp = hasImportance && j <= example.c ? example.i[j] : null;
      const span = el("span", { class: "tok" + (j === example.c ? " max" : ""), text: visible(token) });
      span.dataset.act = String(act);
      if (imp !== null) span.dataset.imp = String(imp);
      span.title = JSON.stringify(token) + "  activation " + fmt(act) + (imp !== null ? "  importance " + fmt(imp, 2) : "");
      span.style.backgroundColor = mode === "importance" ? colour(imp, 1, "importance") : colour(act, neuronData.scale, "activation");
      (j < example.c ? parts.before : parts.after).append(span);
    });
    // The sign is part of the example: a gated neuron's negative examples (selection.sign both or negative)
    const label = "#" + example.r + "  " + (example.a < 0 ? "\u2212" + fmt(-example.a, 2) : "+" + fmt(example.a, 2)) +
      (example.s ? "  " + example.s : "");
    const meta = el("span", { class: "meta", text: label });
    meta.title = "example rank " + example.r + (central ? " (the cluster's central example)" : "") + ", activation " + fmt(example.a) +
      (example.a < 0 ? " (a negative example)" : "") +
      "\ndocument " + example.d + ", token " + example.p + ": " + (block.origins[String(example.d)] || "") +
      (mode === "importance" && !hasImportance ? "\nno token importance for this example" : "");
    const row = el("div", { class: "ex" + (central ? " central" : "") + (hasImportance ? " has-importance" : "") },
      [meta, parts.before, parts.after]);
    row.dataset.rank = String(example.r);
    return row;
  }

  function metricsTable(layerData, neuron) {
    const i = layerData.neuron.indexOf(neuron);
    const rows = [
      ["expert (mixture of experts)", "expert"], ["status (live, few_examples, dead)", "status"], ["examples", "size"],
      ["repeated contexts dropped", "duplicates"], ["feature clusters", "n_clusters"], ["largest cluster share", "largest_cluster_share"],
      ["mean pairwise distance", "mean_distance"], ["max pairwise distance", "max_distance"],
      ["mean intra-cluster distance", "mean_intra_distance"], ["mean inter-cluster distance", "mean_inter_distance"],
      ["clusters vs max token (ARI)", "ari_token"], ["clusters on one token (share)", "single_token_cluster_share"],
      ["clusters of x alone (no weights)", "n_clusters_input"], ["x alone vs x*w (ARI)", "ari_input"],
      ["stability (ARI over subsets)", "stability"],
      ["max activation (corpus)", "max_activation"], ["min activation (corpus)", "min_activation"], ["mean activation (corpus)", "mean_activation"], ["share positive", "frac_positive"],
    ];
    const table = el("table", { class: "metrics" });
    rows.forEach(function (r) {
      if (!layerData[r[1]] || (r[1] === "expert" && (i < 0 || layerData.expert[i] === null))) return;
      table.append(el("tr", null, [el("th", { text: r[0] }), el("td", { text: i < 0 ? "\u2013" : fmt(layerData[r[1]][i]) })]));
    });
    const sweep = layerData.sweep[String(neuron)];
    if (sweep) {
      const t = index.summary[String(current.layer)].sweep.threshold;
      table.append(el("tr", null, [el("th", { text: "clusters at thresholds " + t.join(", ") }), el("td", { text: sweep.join(", ") })]));
    }
    return table;
  }

  function histogramChart(hist) {
    if (!hist || !hist.counts.length) return el("p", { class: "muted", text: "no activation histogram" });
    let labels, caption;
    if (hist.kind === "cache") {
      const edges = index.hist_edges;
      labels = hist.counts.map(function (_, k) {
        const b = hist.first_bin + k;
        const lo = b === 0 ? "-\u221e" : String(edges[b - 1]);
        const hi = b >= edges.length ? "\u221e" : String(edges[b]);
        return "(" + lo + ", " + hi + "]";
      });
      caption = "activation histogram over the corpus (log-spaced bins" + (hist.stride > 1 ? ", 1 token in " + hist.stride : "") + ")";
    } else {
      labels = hist.counts.map(function (_, k) { return fmt(hist.edges[k], 2) + " to " + fmt(hist.edges[k + 1], 2); });
      caption = "activations in this neuron's example windows";
    }
    const lower = function (k) {
      if (hist.kind !== "cache") return short(hist.edges[k]);
      const b = hist.first_bin + k;
      return b === 0 ? "-\u221e" : short(index.hist_edges[b - 1]);
    };
    return barChart(caption, labels, hist.counts, { tick: lower, xlabel: "activation (bin's lower edge)" });
  }

  // ---- views ----
  function renderLayer(layerData) {
    const view = clear($("layer-view"));
    const summary = index.summary[String(current.layer)];
    const i = layerData.neuron.indexOf(current.neuron);
    const nClusters = i < 0 ? null : layerData.n_clusters[i];
    view.append(el("h2", { text: "Layer " + current.layer }));
    const left = summary.left_out || {};
    const base = summary.baselines || {};
    view.append(el("p", { class: "muted", text: summary.neurons + " neurons, " + summary.live + " live (left out: " +
      (left.dead || 0) + " dead, " + (left.few_examples || 0) + " with too few examples); clustering threshold " +
      fmt(summary.threshold, 2) + "; over live neurons, " + fmt(summary.clusters_per_neuron_mean, 2) +
      " clusters per neuron on average, " + fmt(100 * (summary.frac_polysemantic || 0), 1) + "% have more than one" }));
    view.append(el("p", { class: "muted", text: "Baselines (medians over live neurons): clusters vs max token ARI " +
      fmt(base.ari_token_median) + "; clusters of x alone " + fmt(base.clusters_input_only_median) +
      ", ARI with x*w " + fmt(base.ari_input_median) + "; stability " + fmt(base.stability_median) }));
    (summary.compared || []).forEach(function (c) {
      const f = c.frac_polysemantic || {};
      view.append(el("p", { class: "muted", text: "Compared: " + c.model + " (" + c.description + "), layer " + c.layer +
        ": " + c.live + " of " + c.neurons + " live, median " + fmt((c.clusters_median || {}).value, 1) +
        " clusters, " + fmt(100 * (f.value || 0), 1) + "% polysemantic [" + fmt(100 * (f.low || 0), 1) + ", " +
        fmt(100 * (f.high || 0), 1) + "], token ARI " + fmt(c.ari_token_median) }));
    });
    const ch = summary.clusters_hist;
    const clusterLabels = ch.counts.map(function (_, k) { return String(ch.start + k) + " clusters"; });
    const dh = summary.distance_hist;
    const distLabels = dh.counts.map(function (_, k) { return fmt(dh.edges[k], 2) + " to " + fmt(dh.edges[k + 1], 2); });
    let distHighlight = null;
    if (i >= 0 && layerData.mean_distance[i] !== null) {
      distHighlight = dh.edges.findIndex(function (e, k) { return k < dh.counts.length && layerData.mean_distance[i] >= e && layerData.mean_distance[i] <= dh.edges[k + 1]; });
    }
    view.append(el("div", { class: "row" }, [
      barChart("clusters per neuron (this neuron in red)", clusterLabels, ch.counts, { highlight: nClusters === null ? null : nClusters - ch.start, tick: function (k) { return String(ch.start + k); }, xlabel: "clusters" }),
      barChart("mean pairwise cosine distance per neuron", distLabels, dh.counts, { highlight: distHighlight, tick: function (k) { return fmt(dh.edges[k], 2); }, xlabel: "distance" }),
      sweepChart("clusters per neuron vs threshold: mean, 10-90% band, this neuron dashed", summary.sweep, summary.threshold, layerData.sweep[String(current.neuron)]),
    ]));
    function list(title, neurons) {
      return el("div", null, [el("h3", { text: title }), el("ul", { class: "neuron-list" }, neurons.map(function (n) {
        const k = layerData.neuron.indexOf(n);
        return el("li", null, [el("a", { href: linkFor(current.layer, n, 0), text: "neuron " + n }),
          el("span", { class: "muted", text: " " + (k < 0 ? "" : layerData.n_clusters[k] + " clusters") +
            (layerData.importance_neurons.indexOf(n) >= 0 ? " \u00b7 importance" : "") })]);
      }))]);
    }
    view.append(list("Most polysemantic neurons", layerData.featured.most));
    view.append(list("Least polysemantic neurons", layerData.featured.least));
    view.hidden = false;
  }

  function importanceNote(layerData) {
    const imp = index.importance || {};
    const which = imp.neurons === null || imp.neurons === undefined ? "every neuron" :
      "the " + imp.neurons + " most and " + imp.neurons + " least polysemantic neurons of each layer";
    const per = imp.examples_per_cluster === null || imp.examples_per_cluster === undefined ? "every example shown" :
      (imp.examples_per_cluster === 1 ? "the central example" : "the first " + imp.examples_per_cluster + " examples") + " of each cluster";
    const note = el("p", { class: "note", id: "importance-note", text: "Token importance was computed for " + per + " of " + which +
      " (config analyses.importance), not for these examples. Neurons with it: " });
    layerData.importance_neurons.slice(0, 20).forEach(function (n, k) {
      if (k) note.append(", ");
      note.append(el("a", { href: linkFor(current.layer, n, 0), text: String(n) }));
    });
    return note;
  }

  function renderNeuron(layerData, block, neuronData) {
    const view = clear($("neuron-view"));
    const neuron = current.neuron;
    // A mixture of experts numbers its units expert-major; the expert is part of the unit's name
    const at = layerData.neuron.indexOf(neuron);
    const expert = at >= 0 && layerData.expert ? layerData.expert[at] : null;
    view.append(el("h2", { id: "neuron-title", text: "Layer " + current.layer + " \u00b7 neuron " + neuron +
      (expert === null || expert === undefined ? "" : " \u00b7 expert " + expert) }));
    if (!neuronData) {
      view.append(el("p", { class: "muted", text: "This neuron has no examples in this run." }));
      view.hidden = false;
      return;
    }
    view.append(el("div", { class: "row" }, [metricsTable(layerData, neuron), histogramChart(neuronData.hist)]));
    const clusters = neuronData.clusters;
    const selected = Math.min(current.cluster, clusters.length - 1);
    const tabs = el("div", { attrs: { role: "tablist", "aria-label": "feature clusters" }, id: "tabs" });
    clusters.forEach(function (cluster, k) {
      const tab = el("button", { type: "button", class: "tab", text: "cluster " + cluster.id + " \u00b7 " + cluster.size });
      tab.dataset.cluster = String(k);
      tab.setAttribute("role", "tab");
      tab.setAttribute("aria-selected", k === selected ? "true" : "false");
      tab.addEventListener("click", function () { go({ cluster: k }); });
      tabs.append(tab);
    });
    view.append(tabs);
    if (neuronData.n_clusters > clusters.length) {
      view.append(el("p", { class: "note", text: (neuronData.n_clusters - clusters.length) + " smaller clusters not shown (explorer.max_clusters)" }));
    }
    const cluster = clusters[selected];
    const mode = current.color;
    const withImportance = cluster.examples.filter(function (e) { return Array.isArray(e.i); }).length;
    const examples = el("div", { class: "examples", id: "examples" });
    examples.append(el("p", { class: "note", text: "Cluster " + cluster.id + ": " + cluster.size + " example" + (cluster.size === 1 ? "" : "s") +
      (cluster.examples.length < cluster.size ? ", the first " + cluster.examples.length + " shown" : "") +
      "; central example first (mean similarity in cluster " + fmt(cluster.mean_similarity, 2) + "). " +
      (mode === "importance"
        ? "Colour: token importance (green; the drop of the activation when the token is padded, relative to padding the max token); " +
          withImportance + " of these examples have it."
        : "Colour: the neuron's activation (orange positive, blue negative); hover a token for values.") }));
    if (mode === "importance" && !withImportance) examples.append(importanceNote(layerData));
    cluster.examples.forEach(function (example, k) { examples.append(exampleRow(example, block, neuronData, mode, k === 0)); });
    const similar = el("aside", { class: "similar", id: "similar" }, [el("h3", { text: "Similar features in other neurons" })]);
    if (cluster.similar.length) {
      similar.append(el("ol", null, cluster.similar.map(function (s) {
        const link = el("a", { href: linkFor(current.layer, s[0], s[1]), text: "neuron " + s[0] + " \u00b7 cluster " + s[1] });
        link.className = "similar-link";
        return el("li", null, [link, " ", el("span", { class: "tokname", text: visible(s[3]) }), el("span", { class: "muted", text: " " + Number(s[2]).toFixed(2) })]);
      })));
    } else {
      similar.append(el("p", { class: "muted", text: "none above the similarity threshold" }));
    }
    similar.append(el("p", { class: "note", text: "Cosine similarity of the central examples' MLP inputs x." }));
    view.append(el("div", { class: "cluster-panel" }, [examples, similar]));
    view.hidden = false;
  }

  function renderSearch(query) {
    const box = $("search-results");
    if (!query) { box.hidden = true; clear(box); return Promise.resolve(); }
    return load("layer-" + current.layer + "/search").then(function (search) {
      clear(box);
      const q = query.trim().toLowerCase();
      const totals = new Map();
      search.tokens.forEach(function (token, t) {
        const key = token.trim().toLowerCase();
        const exact = key === q;
        if (!exact && !(q.length > 0 && key.indexOf(q) >= 0)) return;
        const hits = search.hits[t];
        for (let k = 0; k < hits.length; k += 3) {
          const entry = totals.get(hits[k]) || { neuron: hits[k], exact: 0, count: 0, best: -Infinity, tokens: [] };
          entry.count += hits[k + 1];
          if (exact) entry.exact += hits[k + 1];
          entry.best = Math.max(entry.best, hits[k + 2]);
          if (entry.tokens.length < 3) entry.tokens.push(token);
          totals.set(hits[k], entry);
        }
      });
      const ranked = Array.from(totals.values()).sort(function (a, b) {
        return b.exact - a.exact || b.count - a.count || b.best - a.best || a.neuron - b.neuron;
      }).slice(0, 60);
      box.append(el("h3", { text: "Neurons of layer " + current.layer + " whose examples peak on \u201c" + query + "\u201d (" + totals.size + ")" }));
      if (!ranked.length) box.append(el("p", { class: "muted", text: "no neuron of this layer has an example peaking on that token" }));
      box.append(el("ol", null, ranked.map(function (r) {
        return el("li", null, [el("a", { href: linkFor(current.layer, r.neuron, 0), text: "neuron " + r.neuron }),
          el("span", { class: "muted", text: " \u00d7" + r.count + " max " + fmt(r.best, 2) + " " }),
          el("span", { class: "tokname", text: r.tokens.map(visible).join(" | ") })]);
      })));
      box.hidden = false;
    });
  }

  function setStatus(text, isError) {
    const status = $("status");
    status.textContent = text;
    status.className = isError ? "error" : "muted";
    status.hidden = !text;
  }

  function render() {
    const mine = ++ticket;
    const state = parseHash();
    if (state.layer === null || index.layers.indexOf(state.layer) < 0) state.layer = index.layers[0];
    current = state;
    $("layer").value = String(state.layer);
    $("importance").checked = state.color === "importance";
    $("search").value = state.q;
    setStatus("Loading\u2026");
    return load("layer-" + state.layer + "/neurons").then(function (layerData) {
      if (mine !== ticket) return null;
      if (state.neuron === null) {
        state.neuron = layerData.featured.most.length ? layerData.featured.most[0] : (layerData.neuron[0] || 0);
        history.replaceState(null, "", hashFor(state));
      }
      $("neuron").value = String(state.neuron);
      const blockKey = "layer-" + state.layer + "/block-" + pad4(Math.floor(state.neuron / index.settings.block_size));
      const blockPromise = layerData.neuron.indexOf(state.neuron) >= 0 ? load(blockKey) : Promise.resolve(null);
      return Promise.all([blockPromise, renderSearch(state.q)]).then(function (results) {
        if (mine !== ticket) return;
        const block = results[0];
        renderNeuron(layerData, block, block ? block.neurons[String(state.neuron)] : null);
        renderLayer(layerData);
        setStatus("");
        document.title = "Layer " + state.layer + " neuron " + state.neuron + " \u00b7 " + index.run + " \u00b7 neuron explorer";
        $("app").dataset.rendered = location.hash;
      });
    }).catch(function (error) {
      if (mine === ticket) setStatus(String(error && error.message ? error.message : error), true);
    });
  }

  function neuronsOfLayer() { return registry["layer-" + current.layer + "/neurons"]; }

  function start(data) {
    index = data;
    $("run-title").textContent = "Neuron explorer \u00b7 " + data.run;
    const select = $("layer");
    data.layers.forEach(function (layer) { select.append(el("option", { value: String(layer), text: String(layer) })); });
    const model = data.model || {};
    $("footer").textContent = "run " + data.run + " \u00b7 model " + (model.source || "?") + " (" + (model.architecture || "?") + ", " +
      (model.n_neurons || "?") + " neurons per layer) \u00b7 neuron-embeddings " + data.version;
    select.addEventListener("change", function () { go({ layer: parseInt(select.value, 10), cluster: 0 }); });
    function showTyped() {
      const v = $("neuron").value;
      if (/^\d{1,9}$/.test(v)) go({ neuron: parseInt(v, 10), cluster: 0 });
    }
    $("go").addEventListener("click", showTyped);
    $("neuron").addEventListener("keydown", function (e) { if (e.key === "Enter") showTyped(); });
    function step(delta) {
      const list = neuronsOfLayer();
      if (!list) return;
      const k = list.neuron.indexOf(current.neuron);
      const next = list.neuron[Math.min(list.neuron.length - 1, Math.max(0, (k < 0 ? 0 : k) + delta))];
      go({ neuron: next, cluster: 0 });
    }
    $("prev").addEventListener("click", function () { step(-1); });
    $("next").addEventListener("click", function () { step(1); });
    $("random").addEventListener("click", function () {
      const list = neuronsOfLayer();
      if (list && list.neuron.length) go({ neuron: list.neuron[Math.floor(Math.random() * list.neuron.length)], cluster: 0 });
    });
    function search() { go({ q: $("search").value.slice(0, 200) }); }
    $("search-go").addEventListener("click", search);
    $("search").addEventListener("keydown", function (e) { if (e.key === "Enter") search(); });
    $("importance").addEventListener("change", function () { go({ color: $("importance").checked ? "importance" : "activation" }); });
    window.addEventListener("hashchange", render);
    return render();
  }

  load("index").then(start).catch(function (error) {
    const status = document.getElementById("status");
    status.textContent = "Could not load the explorer's data (" + (error && error.message ? error.message : error) +
      "). Open index.html from the explorer folder the workflow wrote, with its data/ folder beside it.";
    status.className = "error";
  });
})();
