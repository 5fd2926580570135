// Loaded (deferred) right after plotly.min.js on pages with figures, before the figures' own
// module scripts call Plotly.newPlot. The course works offline: no figure offers plotly's cloud
// ("Share chart...", i.e. sendChartToCloud, on by default in plotly.js 4) or its logo link.
Plotly.setPlotConfig({
  showSendToCloud: false,
  displaylogo: false,
});

// Heatmap cell values only where they fit: on a phone a heatmap with many columns has cells
// narrower than "-0.00", and printed values would run into each other. After every drawing
// (first plot, and each resize of a responsive figure) a heatmap's values are hidden while its
// widest value is wider than a cell, and shown again when the cells are wide enough (hover
// still shows every value).
(() => {
  const PADDING_PX = 2; // between a value and its cell's edges
  const originalTemplates = new WeakMap(); // figure -> {trace index: texttemplate}
  const widestValue = new WeakMap(); // figure -> pixels: its widest printed value, measured while shown

  function fitHeatmapValues(figure) {
    const templates = originalTemplates.get(figure) || {};
    originalTemplates.set(figure, templates);
    // while values are shown, measure the widest one (all heatmaps of a figure print alike)
    const printed = [...figure.querySelectorAll(".heatmaplayer text")];
    if (printed.length) widestValue.set(figure, Math.max(...printed.map((t) => t.getBBox().width)));
    const widest = widestValue.get(figure);
    const toHide = [], toShow = [];
    figure._fullData.forEach((trace, index) => {
      if (trace.type !== "heatmap") return;
      const template = figure.data[index].texttemplate;
      if (!(index in templates)) templates[index] = template;
      const columns = Array.isArray(trace.z) && trace.z.length ? trace.z[0].length : 0;
      const xaxis = figure._fullLayout[trace.xaxis.replace("x", "xaxis")];
      if (!templates[index] || !columns || !xaxis || widest === undefined) return;
      const fits = widest + 2 * PADDING_PX <= xaxis._length / columns;
      if (fits && !template) toShow.push(index);
      if (!fits && template) toHide.push(index);
    });
    if (toHide.length) Plotly.restyle(figure, { texttemplate: "" }, toHide);
    if (toShow.length) Plotly.restyle(figure, { texttemplate: toShow.map((i) => templates[i]) }, toShow);
  }

  const newPlot = Plotly.newPlot;
  Plotly.newPlot = (...args) =>
    newPlot.apply(Plotly, args).then((figure) => {
      fitHeatmapValues(figure);
      figure.on("plotly_afterplot", () => fitHeatmapValues(figure));
      return figure;
    });
})();
