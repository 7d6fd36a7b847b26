"""The views' CSS and JavaScript, as strings inlined into every page (no file to install, no URL to fetch).

The JS defines ``window.gpt2fastViz`` with:

* ``renderPage(root, payload, view)``: title, tabs and the views named by ``view`` ("all", "head",
  "model", "qk") into the element ``root``;
* ``renderHeadView(container, payload, options)``: the head view alone; ``options`` = ``{layer, head,
  maxLines}`` (all optional; ``head`` may be ``"all"``; at most ``maxLines`` = 5000 lines are drawn, the
  strongest). Returns ``{setHead(layer, head), element, state}``; ``state.layer`` and ``state.head`` are
  the reader's current choice. Call it again on the same container with a new payload (and the old
  ``state.layer``/``state.head`` as options) to redraw: the explorer page does after each step;
* ``renderModelView(container, payload, onPick)``: the n_layer x n_head grid of maps; clicking a map
  calls ``onPick(layer, head)``;
* ``renderQKView(container, payload)``: the query/key view (a note when the payload has no q/k);
* ``decode(payload)``: the payload's base64 arrays as typed arrays (cached per payload object).

``payload`` is ``gpt2fast.viz.trace_payload(trace)`` (its docstring gives the format). Token text only
ever reaches the page through ``textContent``, ``new Option(text)`` and ``title`` attributes, never
through HTML strings. The one ``innerHTML`` below parses a constant, to learn the SVG namespace without
writing its URI into the page.
"""

CSS = """
.g2f-root{font:13px/1.35 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d1d1f;margin:8px}
.g2f-title{font-size:17px;margin:0 0 2px}
.g2f-sub,.g2f-note{color:#555;font-size:12px;margin:2px 0 6px}
.g2f-note{background:#f4f6fa;border-left:3px solid #8aa4d6;padding:3px 8px}
.g2f-tabs{display:flex;gap:4px;margin:6px 0;border-bottom:1px solid #ccd}
.g2f-tab{font:inherit;border:1px solid #ccd;border-bottom:none;background:#eef0f5;padding:3px 12px;
  border-radius:5px 5px 0 0;cursor:pointer}
.g2f-tab.g2f-on{background:#fff;font-weight:600}
.g2f-section[hidden]{display:none}
.g2f-controls{display:flex;flex-wrap:wrap;gap:12px;align-items:center;margin:6px 0}
.g2f-controls select{font:inherit}
.g2f-hv-body{display:flex;align-items:flex-start}
.g2f-col{display:flex;flex-direction:column;width:170px;flex:none}
.g2f-tok{box-sizing:border-box;height:var(--g2f-row);line-height:var(--g2f-row);white-space:pre;overflow:hidden;
  text-overflow:ellipsis;padding:0 5px;cursor:default;font:12px ui-monospace,Menlo,Consolas,monospace;
  border-radius:3px}
.g2f-left .g2f-tok{text-align:right}
.g2f-tok.g2f-hover{outline:1px solid #d33;outline-offset:-1px}
.g2f-lines{flex:none;display:block}
.g2f-grid{display:grid;justify-content:start;gap:3px;align-items:center;justify-items:center}
.g2f-label{font-size:11px;color:#555}
.g2f-cell{cursor:pointer;border:1px solid #c8ccd6;line-height:0}
.g2f-cell:hover{border-color:#d33}
.g2f-cell canvas{width:60px;height:60px;image-rendering:pixelated;display:block}
.g2f-qk-row{display:flex;align-items:center;gap:8px;margin:3px 0}
.g2f-qk-name{width:110px;flex:none;text-align:right;font-size:12px}
.g2f-band{display:flex;border:1px solid #c8ccd6}
.g2f-dim{width:7px;height:20px;flex:none}
.g2f-scores{margin-top:8px;display:grid;grid-template-columns:max-content 240px max-content;gap:1px 8px;
  align-items:center;font-size:12px}
.g2f-score-tok{font:12px ui-monospace,Menlo,Consolas,monospace;white-space:pre;text-align:right;cursor:pointer;
  max-width:200px;overflow:hidden;text-overflow:ellipsis}
.g2f-score-tok.g2f-chosen{font-weight:700;color:#b22}
.g2f-bar{height:11px;background:#1f5fbf;min-width:1px}
"""

JS = r"""
(function (global) {
  "use strict";
  var ROW = 16, LINE_WIDTH = 180, MAX_LINES = 5000, BLUE = [31, 95, 191];
  var SVG_NS = (function () {
    var probe = document.createElement("div");
    probe.innerHTML = "<svg></svg>";  // a constant: parsed only to read the SVG namespace
    return probe.firstChild.namespaceURI;
  })();
  var cache = new WeakMap();

  function el(tag, cls, parent) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (parent) parent.appendChild(node);
    return node;
  }
  function text(tag, cls, str, parent) {
    var node = el(tag, cls, parent);
    node.textContent = str;
    return node;
  }
  function range(n) { var out = []; for (var i = 0; i < n; i++) out.push(i); return out; }
  // One row per token: a newline or tab inside a token is shown as an arrow (the title keeps the real text).
  function shown(tok) { return tok.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5"); }
  function bytes(b64) {
    var bin = atob(b64), out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  function half(h) {  // IEEE float16 bits -> number
    var sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 31, frac = h & 1023;
    if (exp === 0) return sign * frac * Math.pow(2, -24);
    if (exp === 31) return frac ? NaN : sign * Infinity;
    return sign * (1 + frac / 1024) * Math.pow(2, exp - 15);
  }
  function halfs(b64) {
    var raw = new Uint16Array(bytes(b64).buffer), out = new Float32Array(raw.length);
    for (var i = 0; i < raw.length; i++) out[i] = half(raw[i]);
    return out;
  }

  function decode(payload) {
    if (cache.has(payload)) return cache.get(payload);
    var T = payload.tokens.length, links = payload.links, maps = payload.maps;
    var start = new Int32Array(T + 1);
    for (var i = 0; i < T; i++) start[i + 1] = start[i] + Math.min(links.per_row, i + 1);
    var d = {
      T: T, L: payload.n_layer, H: payload.n_head, tokens: payload.tokens, perRow: links.per_row,
      start: start, perHead: start[T], index: new Uint16Array(bytes(links.index).buffer),
      prob: new Uint16Array(bytes(links.prob).buffer), mapSize: maps.size, mapBlock: maps.block,
      maps: bytes(maps.data), qk: null
    };
    if (payload.qk) {
      d.qk = {T: payload.qk.n_tokens, D: payload.qk.head_dim, q: halfs(payload.qk.q), k: halfs(payload.qk.k)};
    }
    cache.set(payload, d);
    return d;
  }

  // The stored links of one layer for the given heads: {q, k, p, h, r}, r = rank within its row (0: strongest).
  function collect(d, layer, heads) {
    var out = [];
    heads.forEach(function (h) {
      var base = (layer * d.H + h) * d.perHead;
      for (var q = 0; q < d.T; q++) {
        for (var n = d.start[q]; n < d.start[q + 1]; n++) {
          out.push({q: q, k: d.index[base + n], p: d.prob[base + n] / 65535, h: h, r: n - d.start[q]});
        }
      }
    });
    return out;
  }
  // Over the line budget every row first gets its strongest links, then its next ones: each token keeps lines.
  function byRankThenProb(a, b) { return a.r - b.r || b.p - a.p; }
  function headColor(h, H, all) { return all ? "hsl(" + Math.round(360 * h / H) + ",75%,42%)" : "rgb(" + BLUE + ")"; }

  function picker(parent, label, values, cls, current) {
    var wrap = el("label", "g2f-picker", parent);
    wrap.appendChild(document.createTextNode(label + " "));
    var select = el("select", cls, wrap);
    values.forEach(function (v) { select.appendChild(new Option(String(v), String(v))); });
    select.value = String(current);
    return select;
  }

  function tokenRow(parent, tok, i) {
    var node = text("div", "g2f-tok", shown(tok), parent);
    node.title = i + ": " + tok;
    node.dataset.i = i;
    return node;
  }

  function renderHeadView(container, payload, options) {
    var opts = options || {}, d = decode(payload), maxLines = opts.maxLines || MAX_LINES;
    // options.layer / options.head keep the reader's choice across payloads (the explorer redraws each step)
    var head = opts.head === "all" || (opts.head >= 0 && opts.head < d.H) ? opts.head : 0;
    var state = {layer: opts.layer >= 0 && opts.layer < d.L ? opts.layer : 0, head: head,
                 links: [], hover: null, shaded: []};
    container.textContent = "";
    container.classList.add("g2f-headview");
    container.style.setProperty("--g2f-row", ROW + "px");
    var controls = el("div", "g2f-controls", container);
    var layerSelect = picker(controls, "Layer", range(d.L), "g2f-layer", state.layer);
    var headSelect = picker(controls, "Head", range(d.H).concat(["all"]), "g2f-head", state.head);
    var note = el("div", "g2f-note g2f-head-note", container);
    var body = el("div", "g2f-hv-body", container);
    var left = el("div", "g2f-col g2f-left", body);
    var svg = document.createElementNS(SVG_NS, "svg");
    svg.setAttribute("class", "g2f-lines");
    svg.setAttribute("width", LINE_WIDTH);
    svg.setAttribute("height", d.T * ROW);
    body.appendChild(svg);
    var right = el("div", "g2f-col g2f-right", body);
    var leftTokens = d.tokens.map(function (tok, i) { return tokenRow(left, tok, i); });
    var rightTokens = d.tokens.map(function (tok, i) { return tokenRow(right, tok, i); });

    function heads() { return state.head === "all" ? range(d.H) : [state.head]; }
    function load() {
      state.links = collect(d, state.layer, heads());
      draw();
    }
    function line(x) {
      var node = document.createElementNS(SVG_NS, "line");
      node.setAttribute("x1", 0);
      node.setAttribute("y1", (x.q + 0.5) * ROW);
      node.setAttribute("x2", LINE_WIDTH);
      node.setAttribute("y2", (x.k + 0.5) * ROW);
      node.setAttribute("stroke", headColor(x.h, d.H, state.head === "all"));
      node.setAttribute("stroke-width", 2);
      node.setAttribute("stroke-opacity", x.p.toPrecision(4));
      node.setAttribute("data-q", x.q);
      node.setAttribute("data-k", x.k);
      node.setAttribute("data-h", x.h);
      node.setAttribute("data-p", x.p.toPrecision(4));
      return node;
    }
    function shade(hover, links) {
      state.shaded.forEach(function (node) { node.style.background = ""; node.classList.remove("g2f-hover"); });
      state.shaded = [];
      if (!hover) return;
      var own = (hover.side === "q" ? leftTokens : rightTokens)[hover.i];
      var other = hover.side === "q" ? rightTokens : leftTokens;
      own.classList.add("g2f-hover");
      state.shaded.push(own);
      links.forEach(function (x) {
        var node = other[hover.side === "q" ? x.k : x.q];
        node.style.background = "rgba(" + BLUE + "," + Math.min(1, x.p).toFixed(3) + ")";
        state.shaded.push(node);
      });
    }
    function describe(total, drawn) {
      var which = state.head === "all" ? "all heads (one colour each)" : "head " + state.head;
      var parts = ["Layer " + state.layer + ", " + which + "."];
      if (d.perRow < d.T) {
        parts.push("Showing the " + d.perRow + " strongest of up to " + d.T + " links per token " +
          "(the file keeps no more).");
      }
      if (drawn < total) {
        parts.push("Drawing " + drawn + " of " + total + " lines: each token's strongest first (about " +
          Math.max(1, Math.floor(drawn / d.T)) + " per token).");
      } else {
        parts.push("Drawing all " + total + " lines; opacity = attention weight.");
      }
      if (state.hover) {
        parts.push("Hovering " + (state.hover.side === "q" ? "query" : "key") + " token " + state.hover.i + ".");
      } else {
        parts.push("Hover a token to isolate its lines (left: what it attends to; right: who attends to it).");
      }
      return parts.join(" ");
    }
    function draw() {
      var hover = state.hover, links = state.links;
      if (hover) links = links.filter(function (x) { return (hover.side === "q" ? x.q : x.k) === hover.i; });
      var total = links.length;
      if (total > maxLines) links = links.slice().sort(byRankThenProb).slice(0, maxLines);
      var frag = document.createDocumentFragment();
      links.forEach(function (x) { frag.appendChild(line(x)); });
      svg.textContent = "";
      svg.appendChild(frag);
      shade(hover, links);
      note.textContent = describe(total, links.length);
    }
    function setHead(layer, head) {
      state.layer = layer;
      state.head = head;
      layerSelect.value = String(layer);
      headSelect.value = String(head);
      load();
    }
    function onHover(side) {
      return function (event) {
        var tok = event.target.closest(".g2f-tok");
        if (!tok) return;
        var i = Number(tok.dataset.i);
        if (state.hover && state.hover.side === side && state.hover.i === i) return;
        state.hover = {side: side, i: i};
        draw();
      };
    }
    layerSelect.addEventListener("change", function () { setHead(Number(layerSelect.value), state.head); });
    headSelect.addEventListener("change", function () {
      setHead(state.layer, headSelect.value === "all" ? "all" : Number(headSelect.value));
    });
    left.addEventListener("mouseover", onHover("q"));
    right.addEventListener("mouseover", onHover("k"));
    body.addEventListener("mouseleave", function () { state.hover = null; draw(); });
    load();
    return {setHead: setHead, element: container, state: state};
  }

  function renderModelView(container, payload, onPick) {
    var d = decode(payload), n = d.mapSize;
    container.textContent = "";
    var note = el("div", "g2f-note g2f-model-note", container);
    note.textContent = (d.mapBlock > 1
      ? "Each map is max-pooled from " + d.T + "\u00d7" + d.T + " weights to " + n + "\u00d7" + n + " cells (" +
        d.mapBlock + "\u00d7" + d.mapBlock + " token pairs per cell)."
      : "Each map shows all " + d.T + "\u00d7" + d.T + " weights (rows: queries, columns: keys).") +
      " Darker = more attention (colour \u221d \u221ap). Click a map to open it in the head view.";
    var grid = el("div", "g2f-grid", container);
    grid.style.gridTemplateColumns = "auto repeat(" + d.H + ", max-content)";
    el("div", "g2f-label", grid);
    range(d.H).forEach(function (h) { text("div", "g2f-label", "H" + h, grid); });
    range(d.L).forEach(function (l) {
      text("div", "g2f-label", "L" + l, grid);
      range(d.H).forEach(function (h) {
        var cell = el("div", "g2f-cell", grid);
        cell.dataset.layer = l;
        cell.dataset.head = h;
        cell.title = "layer " + l + ", head " + h;
        var canvas = el("canvas", "", cell);
        canvas.width = canvas.height = n;
        var ctx = canvas.getContext("2d"), image = ctx.createImageData(n, n), base = (l * d.H + h) * n * n;
        for (var c = 0; c < n * n; c++) {
          var v = d.maps[base + c] / 255;
          image.data[4 * c] = 255 - v * (255 - BLUE[0]);
          image.data[4 * c + 1] = 255 - v * (255 - BLUE[1]);
          image.data[4 * c + 2] = 255 - v * (255 - BLUE[2]);
          image.data[4 * c + 3] = 255;
        }
        ctx.putImageData(image, 0, 0);
      });
    });
    grid.addEventListener("click", function (event) {
      var cell = event.target.closest(".g2f-cell");
      if (cell && onPick) onPick(Number(cell.dataset.layer), Number(cell.dataset.head));
    });
    return {element: container};
  }

  function diverging(v, scale) {  // blue (negative) - white - red (positive)
    var t = Math.max(-1, Math.min(1, scale ? v / scale : 0)), a = Math.abs(t);
    var target = t < 0 ? BLUE : [200, 40, 40];
    return "rgb(" + target.map(function (c) { return Math.round(255 - a * (255 - c)); }) + ")";
  }

  function renderQKView(container, payload) {
    var d = decode(payload);
    container.textContent = "";
    if (!d.qk) {
      text("div", "g2f-note g2f-qk-note", "This trace has no query/key vectors, so the query/key view is hidden. " +
        "Capture them with LLM.attention(text, qk=True).", container);
      return {element: container};
    }
    var qk = d.qk, D = qk.D, state = {layer: 0, head: 0, query: qk.T - 1, key: null};
    var controls = el("div", "g2f-controls", container);
    var layerSelect = picker(controls, "Layer", range(d.L), "g2f-qk-layer", 0);
    var headSelect = picker(controls, "Head", range(d.H), "g2f-qk-head", 0);
    var wrap = el("label", "g2f-picker", controls);
    wrap.appendChild(document.createTextNode("Query token "));
    var querySelect = el("select", "g2f-qk-query", wrap);
    range(qk.T).forEach(function (i) {
      querySelect.appendChild(new Option(i + ": " + shown(d.tokens[i]), String(i)));
    });
    querySelect.value = String(state.query);
    var note = el("div", "g2f-note g2f-qk-note", container);
    var bands = el("div", "g2f-bands", container);
    var scores = el("div", "g2f-scores", container);

    function vec(which, token) {
      var base = ((state.layer * d.H + state.head) * qk.T + token) * D;
      return which.subarray(base, base + D);
    }
    function band(name, values, cls) {
      var row = el("div", "g2f-qk-row", bands);
      text("div", "g2f-qk-name", name, row);
      var strip = el("div", "g2f-band " + cls, row), scale = 0;
      values.forEach(function (v) { scale = Math.max(scale, Math.abs(v)); });
      values.forEach(function (v, i) {
        var cell = el("div", "g2f-dim", strip);
        cell.style.background = diverging(v, scale);
        cell.title = "dim " + i + ": " + v.toPrecision(4);
      });
      text("div", "g2f-label", "|max| " + scale.toPrecision(3), row);
    }
    function draw() {
      var q = vec(qk.q, state.query), logits = [], top = 0;
      for (var j = 0; j <= state.query; j++) {
        var k = vec(qk.k, j), s = 0;
        for (var c = 0; c < D; c++) s += q[c] * k[c];
        logits.push(s / Math.sqrt(D));
        if (logits[j] > logits[top]) top = j;
      }
      var most = logits[top], exps = logits.map(function (s) { return Math.exp(s - most); });
      var sum = exps.reduce(function (a, b) { return a + b; }, 0);
      if (state.key === null || state.key > state.query) state.key = top;
      var key = vec(qk.k, state.key), product = Array.prototype.map.call(q, function (v, c) { return v * key[c]; });
      bands.textContent = "";
      band("q (query " + state.query + ")", Array.from(q), "g2f-band-q");
      band("k (key " + state.key + ")", Array.from(key), "g2f-band-k");
      band("q \u2299 k", product, "g2f-band-qk");
      scores.textContent = "";
      logits.forEach(function (s, j) {
        var name = text("div", "g2f-score-tok" + (j === state.key ? " g2f-chosen" : ""), shown(d.tokens[j]), scores);
        name.dataset.key = j;
        name.title = "key " + j + ": " + d.tokens[j];
        var bar = el("div", "g2f-bar", el("div", "", scores));
        bar.style.width = (100 * exps[j] / sum).toFixed(2) + "%";
        text("div", "g2f-label g2f-score", "score " + s.toFixed(3) + "  softmax " + (exps[j] / sum).toFixed(4), scores);
      });
      note.textContent = "Layer " + state.layer + ", head " + state.head + ": q and k of " + D + " dimensions " +
        "(red > 0 > blue, each band scaled to its largest |value|), their elementwise product (its sum / \u221a" +
        D + " is the score), and softmax(q\u00b7k/\u221a" + D + ") over keys 0.." + state.query +
        ". Click a key to compare it." + (qk.T < d.T ? " Query/key vectors are kept for the first " + qk.T +
        " of " + d.T + " tokens only (file size)." : "");
    }
    function reset() {
      state.layer = Number(layerSelect.value);
      state.head = Number(headSelect.value);
      state.query = Number(querySelect.value);
      state.key = null;
      draw();
    }
    [layerSelect, headSelect, querySelect].forEach(function (s) { s.addEventListener("change", reset); });
    scores.addEventListener("click", function (event) {
      var name = event.target.closest(".g2f-score-tok");
      if (!name) return;
      state.key = Number(name.dataset.key);
      draw();
    });
    draw();
    return {element: container};
  }

  var LABELS = {head: "Head view", model: "Model view", qk: "Query / key"};
  function renderPage(root, payload, view) {
    var d = decode(payload);
    var names = view === "all" ? ["head", "model", "qk"] : view === "model" ? ["model", "head"] : [view];
    root.textContent = "";
    text("h1", "g2f-title", payload.title || "Attention", root);
    text("div", "g2f-sub", (payload.model ? payload.model + " \u00b7 " : "") + d.T + " tokens \u00b7 " + d.L +
      " layers \u00d7 " + d.H + " heads", root);
    var tabs = names.length > 1 ? el("div", "g2f-tabs", root) : null, sections = {}, buttons = {};
    names.forEach(function (name) {
      sections[name] = el("section", "g2f-section g2f-" + name + "-section", root);
      if (!tabs) return;
      var button = text("button", "g2f-tab", LABELS[name], tabs);
      button.type = "button";
      button.dataset.view = name;
      button.addEventListener("click", function () { show(name); });
      buttons[name] = button;
    });
    function show(name) {
      names.forEach(function (other) {
        sections[other].hidden = other !== name;
        if (tabs) buttons[other].classList.toggle("g2f-on", other === name);
      });
      root.dataset.active = name;
    }
    var head = sections.head ? renderHeadView(sections.head, payload) : null;
    if (sections.model) {
      renderModelView(sections.model, payload, function (layer, h) {
        head.setHead(layer, h);
        show("head");
        sections.head.scrollIntoView();
      });
    }
    if (sections.qk) renderQKView(sections.qk, payload);
    show(names[0]);
    return {show: show, head: head};
  }

  // Render every page root not rendered yet; its payload is the JSON script right after it.
  function renderPending() {
    document.querySelectorAll("div.g2f-root:not([data-g2f-done])").forEach(function (root) {
      root.setAttribute("data-g2f-done", "1");
      renderPage(root, JSON.parse(root.nextElementSibling.textContent), root.dataset.view);
    });
  }

  global.gpt2fastViz = {
    renderPage: renderPage, renderHeadView: renderHeadView, renderModelView: renderModelView,
    renderQKView: renderQKView, decode: decode, renderPending: renderPending
  };
})(window);
"""
