// The administrators' page: reads and changes through /api/admin/* (the server checks the
// role on every request; this page only shows what it is allowed to see).

const $ = (selector) => document.querySelector(selector);

async function call(method, path, body) {
  const response = await fetch(path, {
    method,
    credentials: "same-origin",
    headers: body === undefined ? {} : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok || data.success === false) {
    throw new Error(data.message || `The server answered ${response.status}.`);
  }
  return data;
}

function showError(error) {
  const box = $("#admin-error");
  box.textContent = error ? error.message : "";
  box.hidden = !error;
}

function cell(row, text) {
  const td = row.insertCell();
  td.textContent = text;
  return td;
}

function userRow(user) {
  const row = document.createElement("tr");
  row.dataset.user = user.userId;
  cell(row, user.userId);
  cell(row, String(user.credits)).className = "credits";
  cell(row, (user.isAdmin ? "administrator" : "user") + (user.disabled ? " (disabled)" : ""));
  cell(row, String(user.tasks));
  cell(row, String(user.creditsSpent));
  const grant = document.createElement("form");
  grant.className = "grant";
  grant.innerHTML = '<input type="number" step="1" required size="6"><button type="submit">Grant</button>';
  grant.querySelector("input").setAttribute("aria-label", `Credits to grant ${user.userId}`);
  grant.addEventListener("submit", async (event) => {
    event.preventDefault();
    const amount = Number(grant.querySelector("input").value);
    try {
      const answer = await call("POST", `api/admin/users/${encodeURIComponent(user.userId)}/credits`, { amount });
      row.querySelector(".credits").textContent = String(answer.credits);
      grant.reset();
      showError(null);
    } catch (error) { showError(error); }
  });
  row.insertCell().append(grant);
  const revoke = document.createElement("button");
  revoke.type = "button";
  revoke.textContent = "Revoke tokens";
  revoke.setAttribute("aria-label", `Revoke every token and session of ${user.userId}`);
  revoke.addEventListener("click", async () => {
    try {
      const answer = await call("POST", `api/admin/users/${encodeURIComponent(user.userId)}/revoke`);
      revoke.textContent = `Revoked ${answer.revoked}`;
      showError(null);
    } catch (error) { showError(error); }
  });
  row.insertCell().append(revoke);
  return row;
}

async function loadUsers() {
  const { users } = await call("GET", "api/admin/users");
  $("#users tbody").replaceChildren(...users.map(userRow));
}

async function loadEngines() {
  const { engines } = await call("GET", "api/admin/engines");
  $("#engines").replaceChildren(...engines.map((engine) => {
    const item = document.createElement("li");
    item.dataset.engine = engine.name;
    item.textContent = `${engine.name}: ${engine.available ? "available" : `not available — ${engine.reason || ""}`}`;
    return item;
  }));
}

async function loadTasks() {
  const { tasks } = await call("GET", "api/admin/tasks?limit=100");
  $("#all-tasks tbody").replaceChildren(...tasks.map((task) => {
    const row = document.createElement("tr");
    for (const text of [task.taskId, task.userId, task.taskType, task.fileName, task.taskStatus,
      task.creditsCost, new Date(task.createdAt).toLocaleString()]) cell(row, String(text));
    return row;
  }));
}

$("#new-user").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  try {
    const made = await call("POST", "api/admin/users", {
      userId: form.userId.value, credits: Number(form.credits.value || 0), admin: form.admin.checked,
    });
    $("#new-user-name").textContent = made.userId;
    $("#new-user-link").value = made.loginUrl;
    $("#new-user-result").hidden = false;
    form.reset();
    showError(null);
    await loadUsers();
  } catch (error) { showError(error); }
});

Promise.all([loadUsers(), loadEngines(), loadTasks()]).catch(showError);
