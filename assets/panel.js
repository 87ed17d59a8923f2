// The panel's hover: names the layer and expert under the pointer on the many-expert grid and routing strip
// (both are single images, so the page holds no per-cell elements). One delegated listener; the images carry
// what it needs in data-* attributes. Routing colours are hues (expert e of E at hue e/E), read back from the
// pixel under the pointer.
(() => {
  const tip = () => {
    let t = document.getElementById("mx-tip");
    if (!t) { t = document.createElement("div"); t.id = "mx-tip"; document.body.appendChild(t); }
    return t;
  };
  const canvases = new WeakMap();
  const pixel = (img, x, y) => {
    let c = canvases.get(img);
    if (!c || c.src !== img.src) {
      const cv = document.createElement("canvas");
      cv.width = img.naturalWidth; cv.height = img.naturalHeight;
      const ctx = cv.getContext("2d", { willReadFrequently: true });
      ctx.drawImage(img, 0, 0);
      c = { src: img.src, ctx }; canvases.set(img, c);
    }
    return c.ctx.getImageData(x, y, 1, 1).data;
  };
  const hue = (r, g, b) => {
    const mx = Math.max(r, g, b), mn = Math.min(r, g, b), d = mx - mn;
    if (!d) return 0;
    let h = mx === r ? ((g - b) / d) % 6 : mx === g ? (b - r) / d + 2 : (r - g) / d + 4;
    return ((h / 6) + 1) % 1;
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
      const k = +img.dataset.k, layer = Math.floor(w / (k + 1)), rank = w % (k + 1);
      text = `token ${+img.dataset.first + c + 1} · layer ${layers[layer]}`;
      if (rank < k) {
        const px = pixel(img, Math.floor(c * img.naturalWidth / cols), Math.floor(w * img.naturalHeight / rows));
        if (px[3] > 200) text += ` · choice ${rank + 1}: expert ${Math.round(hue(px[0], px[1], px[2]) * +img.dataset.experts) % +img.dataset.experts}`;
      }
    }
    t.textContent = text;
    t.style.left = `${ev.clientX + 14}px`; t.style.top = `${ev.clientY + 14}px`; t.style.display = "block";
  });
})();
