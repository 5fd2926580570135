// Layout facts for the navigation and narrow-screen checks (browser_harness.navigation_visit).
// Called as page.evaluate(<this source>, {primaryLinks, secondaryLinks}); returns plain JSON.
({ primaryLinks, secondaryLinks }) => {
  const describe = (el) => {
    const id = el.id ? `#${el.id}` : "";
    const classes = [...el.classList].slice(0, 3).map((c) => `.${c}`).join("");
    const text = (el.textContent || "").replace(/\s+/g, " ").trim().slice(0, 40);
    return `<${el.tagName.toLowerCase()}${id}${classes}> "${text}"`;
  };
  // On screen and on top: its centre is inside the viewport and not covered by anything else.
  const onTop = (el) => {
    const r = el.getBoundingClientRect();
    if (!r.width || !r.height || r.right <= 0 || r.left >= innerWidth || r.bottom <= 0 || r.top >= innerHeight) return false;
    const x = Math.min(Math.max(r.left + r.width / 2, 0), innerWidth - 1);
    const y = Math.min(Math.max(r.top + r.height / 2, 0), innerHeight - 1);
    const hit = document.elementFromPoint(x, y);
    return !!hit && (el.contains(hit) || hit.contains(el));
  };
  const countOnTop = (selector) => [...document.querySelectorAll(selector)].filter(onTop).length;

  // Horizontal overflow: how far the page reaches past the viewport, and the deepest elements doing it
  // (an element inside a box that scrolls or clips horizontally within the viewport does not count).
  const viewportWidth = document.documentElement.clientWidth;
  const scrollWidth = Math.max(document.documentElement.scrollWidth, document.body.scrollWidth);
  const widening = [];
  if (scrollWidth > viewportWidth) {
    for (const el of document.querySelectorAll("body *")) {
      const r = el.getBoundingClientRect();
      if (!r.width || r.right <= viewportWidth + 1) continue;
      let contained = false;
      for (let p = el.parentElement; p && p !== document.body; p = p.parentElement) {
        if (getComputedStyle(p).overflowX !== "visible" && p.getBoundingClientRect().right <= viewportWidth + 1) {
          contained = true;
          break;
        }
      }
      if (!contained) widening.push(el);
    }
  }
  const deepest = widening.filter((el) => !widening.some((other) => other !== el && el.contains(other)));

  const visible = (el) => { const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0 && getComputedStyle(el).visibility !== "hidden"; };
  return {
    viewportWidth,
    scrollWidth,
    widestElements: deepest.slice(0, 8).map((el) => `${describe(el)} reaches x=${Math.round(el.getBoundingClientRect().right)}`),
    primaryLinksOnTop: countOnTop(primaryLinks),
    secondaryLinksOnTop: countOnTop(secondaryLinks),
    visibleSearchFields: [...document.querySelectorAll(".search-button-field, form.bd-search")].filter(visible).length,
    topBarVisible: [...document.querySelectorAll("#pst-header, header.bd-header")].some(visible),
    // Each table in the article: how wide it is, the box it scrolls in, and its type size.
    tables: [...document.querySelectorAll(".bd-article table")].map((t) => ({
      width: t.scrollWidth,
      box: t.parentElement.clientWidth,
      // the smallest type of any text in it (maths excepted: MathJax draws it as SVG, scaled to the text)
      fontPx: Math.min(1e9, ...[t, ...t.querySelectorAll("th, td, th *, td *")]
        .filter((el) => !el.closest("mjx-container") && [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim()))
        .map((el) => parseFloat(getComputedStyle(el).fontSize))),  // 1e9: no text but maths
      head: (t.querySelector("th, td")?.textContent || "").replace(/\s+/g, " ").trim().slice(0, 30),
    })),
  };
}
