// Peer: sharp (the original product's engine) with PROCS images in flight.
// usage: node sharp_pool.js TASKS.json PROCS   (same TASKS.json as the Python peers)
const fs = require("fs");
const sharp = require("sharp");

const [spec, procs] = [JSON.parse(fs.readFileSync(process.argv[2])), Number(process.argv[3])];
sharp.concurrency(1);      // libvips threads per image; PROCS images run side by side
sharp.cache(false);
const { quality, png_compression } = spec.settings;

async function work(task) {
  let image = sharp(task.input).rotate();            // EXIF orientation, then metadata is dropped
  const meta = await sharp(task.input).metadata();
  const [w, h] = meta.orientation >= 5 ? [meta.height, meta.width] : [meta.width, meta.height];
  if (w !== task.width || h !== task.height) {
    image = image.resize(task.width, task.height, { fit: "fill", kernel: "lanczos3" });
  }
  if (task.format === "jpeg") {
    image = image.flatten({ background: "#ffffff" }).jpeg({ quality, optimizeCoding: true, chromaSubsampling: "4:2:0" });
  } else if (task.format === "png") {
    image = image.png({ compressionLevel: png_compression, palette: false });
  } else {
    image = image.webp({ quality, effort: 4 });
  }
  await image.toFile(task.output);
}

async function main() {
  const queue = spec.tasks.slice();
  const lanes = Array.from({ length: procs }, async () => {
    while (queue.length) await work(queue.shift());
  });
  await Promise.all(lanes);
}

main().catch((err) => { console.error(err); process.exit(1); });
