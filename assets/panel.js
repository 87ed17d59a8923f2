// The panel's hover: names the layer and expert under the pointer on the many-expert grid and routing heat map
// (both are single images, so the page holds no per-cell elements). One delegated listener; the images carry
// what it needs in data-* attributes: the grid one state digit per cell, the heat map each cell's count.
(() => {
  const tip = () => {
    let t = document.getElementById("mx-tip");
    if (!t) { t = document.createElement("div"); t.id = "mx-tip"; document.body.appendChild(t); }
    return t;
  };
  const counts = new WeakMap();          // the heat map's counts, split once per image
  const countsOf = (img) => {
    let c = counts.get(img);
    if (!c || c.src !== img.src) { c = { src: img.src, n: img.dataset.n.split(",") }; counts.set(img, c); }
    return c.n;
  };
  document.addEventListener("mousemove", (ev) => {
    const img = ev.target instanceof Element ? ev.target.closest("img[data-mx]") : null;
    const t = tip();
    if (!img) { t.style.display = "none"; return; }
    const r = img.getBoundingClientRect();
    const cols = +img.dataset.cols, rows = +img.dataset.rows;
    const c = Math.max(0, Math.min(cols - 1, Math.floor((ev.clientX - r.left) / r.width * cols)));
    const w = Math.max(0, Math.min(rows - 1, Math.floor((ev.clientY - r.top) / r.height * rows)));
    const layers = img.dataset.layers.split(",");
    let text;
    if (img.dataset.mx === "grid") {
      const names = Object.fromEntries(img.dataset.names.split(",").map((p) => p.split(":")));
      text = `layer ${layers[w]} · expert ${c} · ${names[img.dataset.s[w * cols + c]] || ""}`;
    } else {
      const n = +countsOf(img)[w * cols + c], tokens = +img.dataset.tokens;
      text = `layer ${layers[w]} · expert ${c} · chosen for ${n} of ${tokens} tokens (${Math.round(100 * n / tokens)}%)`;
    }
    t.textContent = text;
    t.style.left = `${ev.clientX + 14}px`; t.style.top = `${ev.clientY + 14}px`; t.style.display = "block";
  });
})();
