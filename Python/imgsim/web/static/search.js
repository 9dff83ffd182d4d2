// The search form: an image chosen, dropped or pasted is sent at once; empty fields are
// left out, so that a search by a stored image has a short, shareable URL.
const form = document.getElementById("upload");
const input = form.querySelector("input[type=file]");
const drop = document.getElementById("drop");

function send(files) {
  const image = [...files].find((file) => file.type.startsWith("image/"));
  if (!image) return;
  const chosen = new DataTransfer();
  chosen.items.add(image);
  input.files = chosen.files;
  form.requestSubmit();
}

input.addEventListener("change", () => input.files.length && form.requestSubmit());
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  send(event.dataTransfer.files);
});
document.addEventListener("paste", (event) => send(event.clipboardData.files));
form.addEventListener("submit", () => form.classList.add("busy"));
form.addEventListener("formdata", (event) => {
  for (const [name, value] of [...event.formData]) {
    if (value === "" || (value instanceof File && !value.name)) event.formData.delete(name);
  }
});
window.addEventListener("pageshow", () => form.classList.remove("busy"));
