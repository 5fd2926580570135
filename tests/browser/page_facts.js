// Gathers, in one round trip, everything the browser tests check about a rendered page.
// Called by browser_harness.py as page.evaluate(<this source>); returns plain JSON.
() => {
  const box = (el) => {
    const r = el.getBoundingClientRect();
    return { x: r.x + window.scrollX, y: r.y + window.scrollY, width: r.width, height: r.height };
  };
  const textOf = (el) => (el.textContent || "").replace(/\s+/g, " ").trim();

  // ---- plotly figures: one entry per output div, rendered or not.
  const figures = [...document.querySelectorAll(".plotly-graph-div")].map((gd, index) => {
    const figureBox = box(gd);
    const svg = gd.querySelector("svg.main-svg");
    const canvases = [...gd.querySelectorAll("canvas")].filter((c) => c.width > 0 && c.height > 0);
    const drawing = svg || canvases[0] || null;
    const drawingBox = drawing ? box(drawing) : { width: 0, height: 0 };
    // The data area: the drag rectangles of the cartesian subplots (relative to the figure div);
    // figures without axes (pie, ...) fall back to the whole figure.
    const areas = [...gd.querySelectorAll(".draglayer .nsewdrag")].map(box).filter((b) => b.width > 0 && b.height > 0);
    let plotArea = null;
    if (areas.length) {
      const left = Math.min(...areas.map((b) => b.x)), top = Math.min(...areas.map((b) => b.y));
      const right = Math.max(...areas.map((b) => b.x + b.width)), bottom = Math.max(...areas.map((b) => b.y + b.height));
      plotArea = { x: left - figureBox.x, y: top - figureBox.y, width: right - left, height: bottom - top };
    }
    const data = gd._fullData || gd.data || [];
    return {
      index,
      id: gd.id || "",
      rendered: gd.classList.contains("js-plotly-plot"),
      hasSvg: !!svg,
      canvasCount: canvases.length,
      drawingWidth: drawingBox.width,
      drawingHeight: drawingBox.height,
      plotArea,
      traceTypes: data.map((t) => t.type || "scatter"),
      textCount: gd.querySelectorAll("svg text").length,
    };
  });

  // ---- math: Sphinx wraps every formula in .math; MathJax 3 puts an mjx-container inside it.
  const mathNodes = [...document.querySelectorAll("span.math, div.math")];
  const untypesetMath = mathNodes
    .filter((n) => !n.querySelector("mjx-container"))
    .map((n) => textOf(n).slice(0, 80));
  const mathErrors = [...document.querySelectorAll("mjx-merror, [data-mjx-error]")].map(
    (n) => (n.getAttribute("data-mjx-error") || textOf(n)).slice(0, 80));
  // Raw TeX left in the prose (outside code, outputs and typeset math) means math was not recognised.
  const article = document.querySelector("article.bd-article, main, [role=main]") || document.body;
  const rawMath = [];
  const skip = "pre, code, script, style, textarea, mjx-container, .highlight, .output, .cell_output, .math";
  const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT, {
    acceptNode: (n) => (n.parentElement && n.parentElement.closest(skip) ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT),
  });
  const rawPatterns = [/\$\$[\s\S]+?\$\$/, /\$[^\s$][^$]*?\$/, /\\\(|\\\)|\\\[|\\\]/, /\\begin\{/, /\\(frac|partial|cdot|mathbb|alpha|nabla)\b/];
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const t = n.textContent;
    for (const hit of rawPatterns.map((p) => t.match(p)).filter(Boolean)) {
      rawMath.push(t.slice(Math.max(0, hit.index - 30), hit.index + hit[0].length + 30).replace(/\s+/g, " "));
    }
  }

  const links = (sel) => [...document.querySelectorAll(sel)].map((a) => ({ text: textOf(a), href: a.href }));
  const linkOrNull = (sel) => { const a = document.querySelector(sel); return a ? { text: textOf(a), href: a.href } : null; };

  return {
    url: location.href,
    title: document.title,
    theme: document.documentElement.dataset.theme || "",
    plotlyLoaded: typeof window.Plotly === "object" && typeof window.Plotly.newPlot === "function",
    mathJaxVersion: (window.MathJax && window.MathJax.version) || "",
    figures,
    mathCount: mathNodes.length,
    typesetCount: document.querySelectorAll("mjx-container").length,
    untypesetMath,
    mathErrors,
    rawMath: rawMath.slice(0, 20),
    favicons: [...document.querySelectorAll('link[rel~="icon"]')].map((l) => l.href),
    logos: [...document.querySelectorAll("img.logo__image")].map((i) => ({ src: i.currentSrc || i.src, naturalWidth: i.naturalWidth })),
    sidebar: links(".bd-sidebar-primary nav a.reference.internal"),
    previous: linkOrNull(".prev-next-area a.left-prev"),
    next: linkOrNull(".prev-next-area a.right-next"),
    downloadNotebookButtons: links("a.btn-download-notebook-button"),
    downloadSourceButtons: links("a.btn-download-source-button"),
    launchButtons: links(".dropdown-launch-buttons a"),
    downloadRoleLinks: links("a.reference.download"),
    searchResults: links("#search-results ul.search li a, ul.search li > a"),
    // External scripts as written in the page: how each loads (blocking or not) and its query string.
    scripts: [...document.querySelectorAll("script[src]")].map((s) => ({
      src: s.src, defer: s.defer, async: s.async, type: s.type || "" })),
    // The theme's repository, edit, issues and launch buttons, and any link to a placeholder owner.
    repositoryButtons: links(
      "a.btn-source-repository-button, a.btn-source-edit-button, a.btn-source-issues-button, .dropdown-launch-buttons a"),
    placeholderLinks: [...document.querySelectorAll("a[href]")].map((a) => a.href).filter((href) => /\/OWNER\b/i.test(href)),
    // plotly's modebar buttons (their data-attr/title), after the figures are drawn.
    modebarButtons: [...new Set([...document.querySelectorAll(".modebar-btn")].map(
      (b) => `${b.getAttribute("data-attr") || ""}|${b.getAttribute("data-val") || ""}|${b.getAttribute("data-title") || ""}`))],
    plotlyContexts: [...document.querySelectorAll(".js-plotly-plot")].map((gd) => {
      const c = gd._context || {};
      return { showLink: !!c.showLink, showSendToCloud: !!c.showSendToCloud, showEditInChartStudio: !!c.showEditInChartStudio,
               displaylogo: !!c.displaylogo };
    }),
    searchSummary: textOf(document.querySelector("#search-results p.search-summary, #search-results > p") || document.createElement("p")),
  };
}
