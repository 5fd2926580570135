// Layout of every plotly figure on the page, in CSS pixels, at the current viewport
// (browser_harness.figure_layout_problems reads it). Called as page.evaluate(<this source>); plain JSON.
() => {
  const box = (el) => {
    const r = el.getBoundingClientRect();
    return { left: r.left, top: r.top, right: r.right, bottom: r.bottom, width: r.width, height: r.height };
  };
  const shown = (el) => {
    if (!(el.textContent || "").trim()) return false;
    const r = el.getBoundingClientRect();
    if (!r.width || !r.height) return false;
    for (let node = el; node && node.nodeType === 1; node = node.parentElement) {
      const style = getComputedStyle(node);
      if (style.display === "none" || style.visibility === "hidden" || style.opacity === "0") return false;
    }
    return true;
  };
  const text = (el) => ({ text: el.textContent.trim().slice(0, 60), ...box(el), fontSize: parseFloat(getComputedStyle(el).fontSize) });
  return [...document.querySelectorAll(".js-plotly-plot")].map((figure, index) => {
    const svg = figure.querySelector("svg.main-svg");
    const modebar = figure.querySelector(".modebar");
    const legend = figure.querySelector("g.legend");
    const inside = (selector) => [...figure.querySelectorAll(selector)].filter(shown).map(text);
    return {
      index,
      id: figure.id,
      figure: svg ? box(svg) : box(figure),
      modebar: modebar ? box(modebar) : null,
      // every piece of text plotly drew (titles, axis labels, legend, cell values), for the toolbar check
      texts: inside("svg.main-svg text"),
      titles: inside(".g-gtitle text, .infolayer > .annotation text"),
      legend: legend && shown(legend) ? box(legend) : null,
      legendTexts: inside("g.legend text"),
      // the plotting areas (one per subplot)
      plotAreas: [...figure.querySelectorAll(".draglayer .nsewdrag")].map(box),
      heatmapValues: inside(".heatmaplayer text"),
    };
  });
}
