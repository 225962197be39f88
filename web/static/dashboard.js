// wanbatch dashboard: confirmations, auto-submitting filters and live refresh. Hand-written, no dependencies.
(function () {
  "use strict";

  // Forms whose action needs a second thought (cancel, rerun) ask first.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });

  // A preview loads nothing until it is asked to play (a page of 50 videos must not open 50
  // downloads); then it gets the browser's own controls.
  function play(video) {
    if (!video.controls) {
      video.controls = true;
      video.play();
    }
  }
  document.addEventListener("click", function (event) {
    var el = event.target;
    if (el.matches && el.matches("video[data-preview]")) {
      play(el);
    }
  });
  document.addEventListener("keydown", function (event) {
    var el = event.target;
    if ((event.key === "Enter" || event.key === " ") && el.matches && el.matches("video[data-preview]") && !el.controls) {
      event.preventDefault();
      play(el);
    }
  });

  // Filter selects apply as soon as they change.
  document.addEventListener("change", function (event) {
    var el = event.target;
    if (el.hasAttribute && el.hasAttribute("data-autosubmit") && el.form) {
      el.form.submit();
    }
  });

  var seconds = Number(document.body.getAttribute("data-refresh")) || 0;
  if (!seconds || !window.fetch || !window.DOMParser) {
    return;
  }

  function playing(root) {
    var videos = root.querySelectorAll("video");
    for (var i = 0; i < videos.length; i++) {
      if (!videos[i].paused && !videos[i].ended) {
        return true;
      }
    }
    return false;
  }

  function busy(root) {
    return root.contains(document.activeElement) && document.activeElement !== document.body;
  }

  // A region of rows (the job list) is updated row by row, so the videos of unchanged rows
  // are not reloaded, and not at all while one of its videos plays.
  function swapRows(current, fresh) {
    if (playing(current)) {
      return;
    }
    var oldRows = current.querySelectorAll("tbody > tr[id]");
    var newRows = fresh.querySelectorAll("tbody > tr[id]");
    var same = oldRows.length === newRows.length && oldRows.length > 0;
    for (var i = 0; same && i < oldRows.length; i++) {
      same = oldRows[i].id === newRows[i].id;
    }
    if (!same) {
      if (current.innerHTML !== fresh.innerHTML) {
        current.innerHTML = fresh.innerHTML;
      }
      return;
    }
    for (var j = 0; j < oldRows.length; j++) {
      if (oldRows[j].innerHTML !== newRows[j].innerHTML) {
        oldRows[j].innerHTML = newRows[j].innerHTML;
        oldRows[j].setAttribute("data-state", newRows[j].getAttribute("data-state") || "");
      }
    }
    var oldPager = current.querySelector(".pager");
    var newPager = fresh.querySelector(".pager");
    if (oldPager && newPager && oldPager.innerHTML !== newPager.innerHTML) {
      oldPager.innerHTML = newPager.innerHTML;
    }
  }

  function refresh() {
    if (document.hidden) {
      return schedule();
    }
    window.fetch(window.location.href, {
      credentials: "same-origin",
      headers: { "Accept": "text/html", "X-Wanbatch-Refresh": "1" }
    }).then(function (response) {
      if (!response.ok || response.redirected) {
        throw new Error("refresh stopped: " + response.status);
      }
      return response.text();
    }).then(function (html) {
      var doc = new DOMParser().parseFromString(html, "text/html");
      var regions = document.querySelectorAll("[data-live][id]");
      for (var i = 0; i < regions.length; i++) {
        var current = regions[i];
        var fresh = doc.getElementById(current.id);
        if (!fresh || busy(current)) {
          continue;
        }
        if (current.hasAttribute("data-rows")) {
          swapRows(current, fresh);
        } else if (current.innerHTML !== fresh.innerHTML) {
          current.innerHTML = fresh.innerHTML;
        }
      }
      document.body.setAttribute("data-refreshed", String(Date.now()));
      schedule();
    }).catch(function () {
      schedule(seconds * 5);
    });
  }

  function schedule(delay) {
    window.setTimeout(refresh, (delay || seconds) * 1000);
  }

  schedule();
})();
