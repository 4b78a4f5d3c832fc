{{/* Chart name, truncated to the 63 characters a label value may hold. */}}
{{- define "branchmerge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: <release>-<chart> unless the release name already contains the chart name. */}}
{{- define "branchmerge.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "branchmerge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "branchmerge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "branchmerge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "branchmerge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: branchmerge
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "branchmerge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "branchmerge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository@digest, or repository:tag (tag defaults to the chart's appVersion). Call with (list $image $) */}}
{{- define "branchmerge.imageRef" -}}
{{- $img := index . 0 -}}
{{- $root := index . 1 -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default $root.Chart.AppVersion $img.tag | toString) -}}
{{- end -}}
{{- end -}}

{{/* The namespaces watched in namespaced mode (the release namespace when none are listed). */}}
{{- define "branchmerge.watchNamespaces" -}}
{{- if .Values.watchNamespaces -}}
{{- toYaml (uniq .Values.watchNamespaces) -}}
{{- else -}}
{{- toYaml (list .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{- define "branchmerge.validate" -}}
{{- if and .Values.clusterWide .Values.watchNamespaces -}}
{{- fail "watchNamespaces lists namespaces but clusterWide is true: set clusterWide=false to watch only those namespaces, or empty watchNamespaces to watch all" -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) -}}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled" -}}
{{- end -}}
{{- end -}}

{{/*
RBAC rules of the operator. Cluster-wide mode adds what kopf needs to notice CRDs and
namespaces. Keep in step with manifests/rbac/ (tests/unit/test_chart_rbac.py compares both
with one table). Call with (dict "clusterWide" bool).
*/}}
{{- define "branchmerge.rbacRules" -}}
{{- if .clusterWide }}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end }}
- apiGroups: [branchmerge.io]
  resources: [distillations]
  verbs: [get, list, watch]
- apiGroups: [branchmerge.io]
  resources: [branchjobs]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [branchmerge.io]
  resources: [distillations/status, branchjobs/status]
  verbs: [get, patch, update]
- apiGroups: [branchmerge.io]
  resources: [distillations/finalizers, branchjobs/finalizers]
  verbs: [update]
- apiGroups: [""]
  resources: [pods, services]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, delete]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}
