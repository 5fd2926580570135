// Loaded (deferred) right after plotly.min.js on pages with figures, before the figures' own
// module scripts call Plotly.newPlot. The course works offline: no figure offers plotly's
// cloud ("Edit in Chart Studio", "Share chart"/sendDataToCloud) or its logo link.
Plotly.setPlotConfig({
  showLink: false,
  showSendToCloud: false,
  showEditInChartStudio: false,
  displaylogo: false,
});
