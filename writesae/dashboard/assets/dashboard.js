// WriteSAE dashboard: navigation, sorting, and lazy atom pages. The atom list and the atoms' pages
// are pre-rendered HTML, gzip-compressed and base64-encoded in #wsd-data (pages in chunks of a few
// atoms); a chunk is inflated (DecompressionStream) only when one of its atoms is opened, so a
// 2,048-atom dashboard opens at once.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("wsd-data").textContent);
  const listView = document.getElementById("wsd-list");
  const atomView = document.getElementById("wsd-atom");
  const chunks = new Map();

  function inflate(base64) {
    const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return new Response(stream).text();
  }

  function chunk(i) {
    if (!chunks.has(i)) chunks.set(i, inflate(data.chunks[i]).then(JSON.parse));
    return chunks.get(i);
  }

  function sortBy(th) {
    const table = th.closest("table");
    const key = th.dataset.key;
    const ascending = th.classList.contains("desc");
    table.querySelectorAll("th").forEach((h) => h.classList.remove("asc", "desc"));
    th.classList.add(ascending ? "asc" : "desc");
    const text = th.hasAttribute("data-text");
    const value = (row) => (text ? row.dataset[key] : parseFloat(row.dataset[key]));
    const tbody = table.tBodies[0];
    const rows = Array.from(tbody.rows);
    rows.sort((a, b) => {
      const x = value(a), y = value(b);
      const missingX = x === "" || Number.isNaN(x), missingY = y === "" || Number.isNaN(y);
      if (missingX || missingY) return missingX - missingY; // missing values last, either way
      const order = text ? String(x).localeCompare(String(y)) : x - y;
      return ascending ? order : -order;
    });
    rows.forEach((row) => tbody.appendChild(row));
  }

  async function route() {
    const match = location.hash.match(/^#atom-(\d+)$/);
    if (match) {
      const i = data.atoms[match[1]];
      atomView.innerHTML = i === undefined
        ? `<p class="wsd-error">Atom ${match[1]} did not fire on this text, so it has no page.</p>`
        : (await chunk(i))[match[1]];
      listView.hidden = true;
      atomView.hidden = false;
      window.scrollTo(0, 0);
      document.body.dataset.view = "atom-" + match[1];
    } else {
      if (!listView.dataset.filled) {
        listView.innerHTML = await inflate(data.list);
        listView.dataset.filled = "1";
      }
      atomView.hidden = true;
      listView.hidden = false;
      document.body.dataset.view = "list";
    }
  }

  listView.addEventListener("click", (event) => {
    const th = event.target.closest("th[data-key]");
    if (th) sortBy(th);
    const row = event.target.closest("tr[data-atom]");
    if (row && !event.target.closest("a")) location.hash = "#atom-" + row.dataset.atom;
  });
  document.getElementById("wsd-jump").addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = "#atom-" + event.target.elements.atom.value.trim();
  });
  window.addEventListener("hashchange", route);
  if (typeof DecompressionStream === "undefined") {
    listView.innerHTML = '<p class="wsd-error">This browser cannot decompress the dashboard (no DecompressionStream); open it in a current Chrome, Firefox or Safari.</p>';
  } else {
    route();
  }
})();
