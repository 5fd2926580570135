// Loaded (deferred) right after plotly.min.js on pages with figures, before the figures' own
// module scripts call Plotly.newPlot. The course works offline: no figure offers plotly's cloud
// ("Share chart...", i.e. sendChartToCloud, on by default in plotly.js 4) or its logo link.
Plotly.setPlotConfig({
  showSendToCloud: false,
  displaylogo: false,
});
