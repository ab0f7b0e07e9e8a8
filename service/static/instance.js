// One instance of a dataset as the model sees it: its box's crop with its labelled keypoints and skeleton drawn, the
// same on the new-job form's preview and in a dataset's gallery.

import {drawKeypoints} from "/static/keypoints.js";

/**
 * Draws the instance's crop (the bbox's square enlarged x1.25 around its centre, as the model's input) of `image`
 * (anything drawImage takes) on a size x size canvas, with its labelled keypoints (v > 0), numbered as the dataset
 * numbers them, and the skeleton's edges between them.
 */
export function drawInstance(canvas, image, instance, {size = 280, radius = 4.5} = {}) {
  const [bx, by, bw, bh] = instance.bbox;
  const side = 1.25 * Math.max(bw, bh);
  const sx = bx + bw / 2 - side / 2, sy = by + bh / 2 - side / 2;
  canvas.width = size;
  canvas.height = size;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#ddd";
  ctx.fillRect(0, 0, size, size);
  ctx.drawImage(image, sx, sy, side, side, 0, 0, size, size);
  const at = ([x, y]) => [(x - sx) / side * size, (y - sy) / side * size];
  const points = instance.keypoints.map(([x, y, v]) => (v > 0 ? [x, y] : null));
  drawKeypoints(ctx, points, {at, edges: instance.skeleton || [], radius});
}
