// A dataset page's gallery: one category's instances of a split and subset, a page at a time (GET
// /categories/{id}/instances), each drawn with its keypoints and skeleton on its image. The images come with the
// key header, as blobs: a key never goes into a URL.

import {blobURL, getJSON} from "/static/api.js";
import {drawInstance} from "/static/instance.js";
import {$, h} from "/static/ui.js";

export const PAGE = 10; // two rows of a wide window
const SIZE = 240; // CSS px: each instance's crop

function instanceQuery(dataset, split, subset) {
  return new URLSearchParams({dataset, split, subset});
}

/** One instance: its crop drawn once its image arrives, what it is, and a link to train a single-image job on it. */
function card(dataset, split, subset, instance) {
  const canvas = h("canvas", {class: "instance", width: SIZE, height: SIZE,
                              "aria-label": `instance ${instance.index} with its keypoints`,
                              dataset: {index: instance.index, k: instance.keypoints.length}});
  const labelled = instance.keypoints.filter(([, , v]) => v > 0).length;
  const train = subset === "train" ? h("a", {
    class: "train-link small",
    href: `/new?${new URLSearchParams({dataset, split, category_id: instance.category_id, image_index: instance.index,
                                       mode: "single_image"})}`,
  }, "Train on it") : null;
  return h("figure", {class: "instance-card", dataset: {index: instance.index}},
    canvas,
    h("figcaption", {},
      h("div", {}, h("strong", {}, `#${instance.index}`), " ", h("span", {class: "mono small"}, instance.file_name)),
      h("div", {class: "muted small"}, `${labelled} of ${instance.keypoints.length} keypoints labelled · `
        + `${instance.skeleton.length ? `${instance.skeleton.length} edges` : "no skeleton"} · annotation ${instance.annotation_id}`),
      train));
}

async function draw(figure, dataset, split, subset, instance) {
  const canvas = figure.querySelector("canvas");
  const path = `/categories/${instance.category_id}/instances/${instance.index}/image?${instanceQuery(dataset, split, subset)}`;
  const url = await blobURL(path);
  if (!url) throw new Error(`the image of ${instance.file_name} is missing`);
  try {
    const image = new Image();
    image.src = url;
    await image.decode();
    drawInstance(canvas, image, instance, {size: SIZE, radius: 3.5});
    canvas.dataset.drawn = "true";
  } finally {
    URL.revokeObjectURL(url);
  }
}

export class Gallery {
  constructor(dataset, {onPage} = {}) {
    this.dataset = dataset;
    this.onPage = onPage; // (category, offset): the page remembers where it is
    this.seq = 0;
    $("#gallery-prev").addEventListener("click", () => this.show(this.category, this.split, this.offset - PAGE));
    $("#gallery-next").addEventListener("click", () => this.show(this.category, this.split, this.offset + PAGE));
  }

  /** The category's instances from offset on (its own subset of the split); a later call wins over an earlier one. */
  async show(category, split, offset = 0) {
    const seq = ++this.seq;
    Object.assign(this, {category, split, offset: Math.max(0, offset)});
    const subset = category.subset;
    const section = $("#gallery-section");
    section.hidden = false;
    delete document.body.dataset.gallery;
    $("#gallery-title").textContent = `${category.id} · ${category.name} · K=${category.num_keypoints} · ${subset}`;
    $("#gallery-error").hidden = true;
    this.onPage?.(category, this.offset);
    const query = instanceQuery(this.dataset, split, subset);
    query.set("offset", this.offset);
    query.set("limit", PAGE);
    try {
      const page = await getJSON(`/categories/${category.id}/instances?${query}`);
      if (seq !== this.seq) return;
      const last = Math.min(page.total, page.offset + page.items.length);
      $("#gallery-count").textContent = page.total ? `${page.offset + 1}–${last} of ${page.total}` : "no instances";
      $("#gallery-prev").disabled = page.offset === 0;
      $("#gallery-next").disabled = last >= page.total;
      const figures = page.items.map((instance) => card(this.dataset, split, subset, instance));
      $("#gallery").replaceChildren(...figures);
      const drawn = await Promise.allSettled(
        page.items.map((instance, i) => draw(figures[i], this.dataset, split, subset, instance)));
      if (seq !== this.seq) return;
      const failed = drawn.filter((r) => r.status === "rejected").map((r) => r.reason.message);
      if (failed.length) this.error(failed.join("; "));
      document.body.dataset.gallery = `${category.id}:${page.offset}`;
    } catch (error) {
      if (seq !== this.seq) return;
      $("#gallery").replaceChildren();
      this.error(error.message);
    }
  }

  error(message) {
    $("#gallery-error").textContent = message;
    $("#gallery-error").hidden = false;
  }
}
