// The upload form: files by drag and drop or picker, the task type and its
// parameters from api/task-types, the cost rule, and one task per file.

import * as api from './api.js';
import { has, t } from './i18n.js';

const COMMON_LANGS = ['zh', 'en', 'ja', 'ko', 'fr', 'de', 'es', 'it', 'pt', 'ru', 'ar'];

function newKey() {
  // randomUUID needs a secure context; plain http on a LAN address is not one.
  return crypto.randomUUID?.() ?? `${Date.now()}-${Math.random().toString(36).slice(2)}`;
}

/** Label text of a parameter: the dictionary's, or its name. */
const paramLabel = (name) => (has(`param.${name}`) ? t(`param.${name}`) : name);

export class UploadForm {
  /** `onCreated(task)` after each task made; `onFirstSubmit()` once, on the first upload. */
  constructor(form, { onCreated, onFirstSubmit }) {
    this.form = form;
    this.onCreated = onCreated;
    this.onFirstSubmit = onFirstSubmit;
    this.types = [];
    this.files = []; // {file, key}: the key makes a repeated submit of one file idempotent
    this.values = {}; // parameter values typed so far, kept across re-renders
    this.glossaries = []; // the user's glossaries, for the glossary picker
    this.busy = false;
    this.submitted = false;
    this.q = (selector) => form.querySelector(selector);
    this.wire();
  }

  wire() {
    const zone = this.q('#drop-zone');
    const input = this.q('#file-input');
    input.addEventListener('change', () => {
      this.addFiles(input.files);
      input.value = '';
    });
    for (const name of ['dragenter', 'dragover']) {
      zone.addEventListener(name, (event) => {
        event.preventDefault();
        zone.classList.add('dragging');
      });
    }
    for (const name of ['dragleave', 'drop']) {
      zone.addEventListener(name, () => zone.classList.remove('dragging'));
    }
    zone.addEventListener('drop', (event) => {
      event.preventDefault();
      this.addFiles(event.dataTransfer.files);
    });
    // A file dropped beside the zone must not make the browser leave the page.
    window.addEventListener('dragover', (event) => event.preventDefault());
    window.addEventListener('drop', (event) => event.preventDefault());
    this.q('#task-type').addEventListener('change', () => this.renderParams());
    this.q('#upload-quote').addEventListener('click', () => this.quote());
    this.form.addEventListener('submit', (event) => {
      event.preventDefault();
      this.submit();
    });
  }

  /** Show the task types of `api/task-types` (and fetch the user's glossaries). */
  load(types) {
    this.types = types;
    api.glossaries().then(({ glossaries }) => {
      this.glossaries = glossaries;
      // Only the picker's options change: the rest of the form may be in use.
      const picker = this.q('#param-glossary');
      if (picker) this.fillGlossaries(picker);
    }, () => {}); // without the list the picker offers none; the form still works
    const select = this.q('#task-type');
    // Translation is what most people come for; keep any earlier choice.
    const chosen = select.value || (types.some((type) => type.taskType === 'translate') ? 'translate' : '');
    select.replaceChildren(
      ...types.map((type) => {
        const label = has(`type.${type.taskType}`) ? t(`type.${type.taskType}`) : type.taskType;
        return new Option(label, type.taskType, false, type.taskType === chosen);
      }),
    );
    this.renderParams();
    this.renderFiles();
  }

  get selectedType() {
    return this.types.find((type) => type.taskType === this.q('#task-type').value) ?? this.types[0];
  }

  renderParams() {
    const type = this.selectedType;
    const box = this.q('#params');
    box.replaceChildren();
    this.q('#quote-list').replaceChildren();
    if (!type) return;
    this.q('#type-description').textContent = type.description ?? '';
    for (const [name, spec] of Object.entries(type.params ?? {})) {
      box.append(this.paramField(type, name, spec));
    }
    this.q('#cost-rule').textContent = t('upload.cost', { rule: type.cost });
    // Say what each file becomes where it changes kind (".pdf → .docx").
    const results = type.results ?? {};
    const accepted = type.extensions.map((ext) =>
      results[ext] && results[ext] !== ext ? `${ext} → ${results[ext]}` : ext);
    this.q('#accepts').textContent = t('upload.accepts', { list: accepted.join(' ') });
    this.q('#file-input').accept = type.extensions.join(',');
  }

  paramField(type, name, spec) {
    const id = `param-${name}`;
    const field = document.createElement('div');
    field.className = 'field';
    const label = document.createElement('label');
    label.htmlFor = id;
    label.textContent = paramLabel(name) + (spec.required ? ' *' : '');
    let control;
    if (name === 'glossary') {
      control = document.createElement('select');
      this.fillGlossaries(control);
    } else if (name === 'engine' && type.engines) {
      control = document.createElement('select');
      for (const engine of type.engines) {
        // An offline engine says which language pairs it has installed.
        const pairs = (engine.pairs ?? []).map(([from, to]) => `${from} → ${to}`).join(', ');
        const label = pairs ? t('engine.pairs', { name: engine.name, pairs }) : engine.name;
        const text = engine.available ? label : t('engine.unavailable', { name: engine.name, reason: engine.reason });
        const option = new Option(text, engine.name);
        option.disabled = !engine.available;
        if (!engine.available) option.title = engine.reason ?? '';
        control.append(option);
      }
      const wanted = this.values[name] ?? spec.default;
      const usable = type.engines.find((e) => e.name === wanted && e.available) ?? type.engines.find((e) => e.available);
      if (usable) control.value = usable.name;
    } else if (spec.choices) {
      control = document.createElement('select');
      for (const choice of spec.choices) control.append(new Option(choice, choice));
      control.value = this.values[name] ?? spec.default ?? spec.choices[0];
    } else {
      control = document.createElement('input');
      control.type = 'text';
      control.autocomplete = 'off';
      control.value = this.values[name] ?? spec.default ?? '';
      if (name.endsWith('Lang')) {
        control.setAttribute('list', 'lang-list');
        control.placeholder = name === 'targetLang' ? 'zh, en, ja…' : 'auto';
      }
    }
    control.id = id;
    control.name = name;
    control.required = Boolean(spec.required);
    control.addEventListener('input', () => {
      this.values[name] = control.value;
      this.q('#quote-list').replaceChildren(); // a quote is for the params it was made with
    });
    field.append(label, control);
    if (spec.description) {
      const hint = document.createElement('small');
      hint.id = `${id}-hint`;
      hint.className = 'hint';
      hint.textContent = spec.description;
      control.setAttribute('aria-describedby', hint.id);
      field.append(hint);
    }
    return field;
  }

  /** Price each chosen file as it would be created now (memory hits included). */
  async quote() {
    if (this.busy) return;
    this.clearMessages();
    if (!this.files.length) {
      this.showError(t('upload.chooseFile'));
      return;
    }
    if (!this.form.reportValidity()) return;
    this.busy = true;
    const list = this.q('#quote-list');
    list.replaceChildren();
    const type = this.selectedType.taskType;
    const params = this.params();
    try {
      for (const entry of this.files) {
        this.q('#upload-status').textContent = t('upload.quoting', { name: entry.file.name });
        const item = document.createElement('li');
        try {
          const { quote } = await api.quoteTask(entry.file, type, params);
          item.textContent = quoteText(entry.file.name, quote);
          item.dataset.credits = String(quote.credits);
          item.dataset.fromMemory = String(quote.fromMemory);
        } catch (error) {
          const message = error.code && has(`error.${error.code}`) ? t(`error.${error.code}`) : error.message;
          item.textContent = t('upload.fileError', { name: entry.file.name, message });
          item.className = 'form-error';
        }
        list.append(item);
      }
    } finally {
      this.busy = false;
      this.q('#upload-status').textContent = '';
    }
  }

  /** The glossary picker's options: none, then the user's glossaries by name. */
  fillGlossaries(select) {
    const chosen = this.values.glossary ?? select.value ?? '';
    select.replaceChildren(new Option(t('glossary.none'), ''));
    for (const g of this.glossaries) {
      select.append(new Option(t('glossary.option', {
        name: g.name, source: g.sourceLang, target: g.targetLang, terms: g.terms }), g.name));
    }
    select.value = this.glossaries.some((g) => g.name === chosen) ? chosen : '';
  }

  addFiles(fileList) {
    this.q('#quote-list').replaceChildren();
    for (const file of fileList) this.files.push({ file, key: newKey() });
    this.clearMessages();
    this.renderFiles();
  }

  renderFiles() {
    const list = this.q('#file-list');
    list.replaceChildren();
    this.q('#no-files').hidden = this.files.length > 0;
    for (const entry of this.files) {
      const item = document.createElement('li');
      const name = document.createElement('span');
      name.textContent = `${entry.file.name} (${formatSize(entry.file.size)})`;
      const remove = document.createElement('button');
      remove.type = 'button';
      remove.className = 'icon-button';
      remove.setAttribute('aria-label', t('upload.remove', { name: entry.file.name }));
      remove.textContent = '×';
      remove.addEventListener('click', () => {
        this.files = this.files.filter((other) => other !== entry);
        this.renderFiles();
        this.q('#file-input').focus();
      });
      item.append(name, remove);
      list.append(item);
    }
  }

  params() {
    const params = {};
    for (const control of this.q('#params').querySelectorAll('input, select')) {
      if (control.value.trim() !== '') params[control.name] = control.value.trim();
    }
    return params;
  }

  clearMessages() {
    this.q('#upload-errors').replaceChildren();
    this.q('#upload-status').textContent = '';
  }

  showError(text) {
    const item = document.createElement('li');
    item.textContent = text;
    this.q('#upload-errors').append(item);
  }

  async submit() {
    if (this.busy) return;
    this.clearMessages();
    if (!this.files.length) {
      this.showError(t('upload.chooseFile'));
      this.q('#file-input').focus();
      return;
    }
    if (!this.form.reportValidity()) return;
    if (!this.submitted) this.onFirstSubmit();
    this.submitted = true;
    this.busy = true;
    const button = this.q('#upload-submit');
    button.disabled = true;
    const type = this.selectedType.taskType;
    const params = this.params();
    const kept = [];
    const done = [];
    try {
      for (const entry of this.files) {
        this.q('#upload-status').textContent = t('upload.submitting', { name: entry.file.name });
        try {
          const { task, quote } = await api.createTask(entry.file, type, params, entry.key);
          const fromMemory = quote?.fromMemory ?? 0;
          done.push(fromMemory
            ? t('upload.createdMemory', { id: task.taskId, name: task.fileName, cost: task.creditsCost,
              n: fromMemory, total: quote.segments })
            : t('upload.created', { id: task.taskId, name: task.fileName, cost: task.creditsCost }));
          this.onCreated(task);
        } catch (error) {
          // The same key again: if the answer was lost after the server made the
          // task, a second try must not make (and charge) another one.
          kept.push(entry);
          const message = error.code && has(`error.${error.code}`) ? t(`error.${error.code}`) : error.message;
          this.showError(t('upload.fileError', { name: entry.file.name, message }));
        }
      }
    } finally {
      this.busy = false;
      button.disabled = false;
    }
    this.files = kept;
    this.q('#quote-list').replaceChildren();
    this.renderFiles();
    this.q('#upload-status').textContent = done.join(' ');
  }
}

function quoteText(name, quote) {
  if (quote.fromMemory) {
    return t('upload.quotedMemory', { name, cost: quote.credits, n: quote.fromMemory, total: quote.segments });
  }
  return t('upload.quoted', { name, cost: quote.credits });
}

function formatSize(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

/** The `<datalist>` of common language codes for the language inputs. */
export function langDatalist() {
  const list = document.createElement('datalist');
  list.id = 'lang-list';
  for (const code of COMMON_LANGS) list.append(new Option(code, code));
  return list;
}
