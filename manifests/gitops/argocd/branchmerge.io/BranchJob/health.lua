-- Argo CD health check for branchmerge.io Distillation and BranchJob (the same script for
-- both kinds; docs/gitops.md shows how to install it). Lua 5.1, as Argo CD runs it.
--
--   Suspended    spec.runPolicy.suspend (set by the user or by Kueue), phase Suspended or
--                condition Suspended=True
--   Degraded     condition Failed=True or Stalled=True (reason: message)
--   Healthy      condition Ready=True or Succeeded=True
--   Progressing  no status yet, status older than metadata.generation, or anything else
local hs = {}

local function find(conditions, ctype)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

local function describe(c, fallback)
  if c == nil then
    return fallback
  end
  local message = c.message
  if message == nil or message == "" then
    message = fallback
  end
  if c.reason ~= nil and c.reason ~= "" then
    if message == nil or message == "" then
      return c.reason
    end
    return c.reason .. ": " .. message
  end
  return message
end

local spec_suspended = obj.spec ~= nil and obj.spec.runPolicy ~= nil and obj.spec.runPolicy.suspend == true
local status = obj.status

if status == nil or (status.conditions == nil and status.phase == nil) then
  if spec_suspended then
    hs.status = "Suspended"
    hs.message = "Suspended: spec.runPolicy.suspend is true"
  else
    hs.status = "Progressing"
    hs.message = "Waiting for the operator to report status"
  end
  return hs
end

-- A status written for an older spec says nothing about the current one.
local generation = obj.metadata ~= nil and obj.metadata.generation or nil
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  if spec_suspended then
    hs.status = "Suspended"
    hs.message = "Suspended: spec.runPolicy.suspend is true"
  else
    hs.status = "Progressing"
    hs.message = "Waiting for the operator to act on generation " .. tostring(generation)
    if status.observedGeneration ~= nil then
      hs.message = hs.message .. " (status is for generation " .. tostring(status.observedGeneration) .. ")"
    end
  end
  return hs
end

local conditions = status.conditions
local failed = find(conditions, "Failed")
if is_true(failed) then
  hs.status = "Degraded"
  hs.message = describe(failed, "Failed")
  return hs
end
local stalled = find(conditions, "Stalled")
if is_true(stalled) then
  hs.status = "Degraded"
  hs.message = describe(stalled, "Stalled")
  return hs
end

local suspended = find(conditions, "Suspended")
if spec_suspended or status.phase == "Suspended" or is_true(suspended) then
  hs.status = "Suspended"
  if is_true(suspended) then
    hs.message = describe(suspended, "Suspended")
  else
    hs.message = "Suspended: spec.runPolicy.suspend is true"
  end
  return hs
end

local ready = find(conditions, "Ready")
local succeeded = find(conditions, "Succeeded")
if is_true(ready) or is_true(succeeded) then
  hs.status = "Healthy"
  if is_true(succeeded) then
    hs.message = describe(succeeded, "Succeeded")
  else
    hs.message = describe(ready, "Ready")
  end
  return hs
end

hs.status = "Progressing"
local reconciling = find(conditions, "Reconciling")
if is_true(reconciling) then
  hs.message = describe(reconciling, "Reconciling")
elseif ready ~= nil then
  hs.message = describe(ready, "Not ready")
elseif status.phase ~= nil then
  hs.message = "Phase: " .. status.phase
else
  hs.message = "Waiting for the operator to report status"
end
return hs
