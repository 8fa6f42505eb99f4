// The Python module spqr_hf._C. Importing it runs the static registrations in ops.cpp (the CPU
// kernel of spqr_hf::spqr_linear); it also reports which instruction set the kernels use.
#include <Python.h>

#include <cstdlib>
#include <string>

#include "cpu_features.h"
#include "kernels.h"
#include "spqr_hf/planes.h"

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
  std::string error;
  const spqr_hf::cpu::KernelTable* table = spqr_hf::cpu::select_kernels(&error);
  if (table == nullptr) {
    PyErr_SetString(PyExc_ValueError, error.c_str());
    return nullptr;
  }
  return PyUnicode_FromString(table->name);
}

PyObject* supported_isas(PyObject*, PyObject*) {
  const auto names = spqr_hf::cpu::supported_isas();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(names.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < names.size(); ++i) PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), PyUnicode_FromString(names[i].c_str()));
  return list;
}

PyObject* plane_kernels(PyObject*, PyObject*) {
  std::string error;
  const spqr_hf::cpu::KernelTable* table = spqr_hf::cpu::select_kernels(&error);
  return PyBool_FromLong(table != nullptr && spqr_hf::cpu::has_plane_kernels(*table));
}

PyObject* plane_layout_fits(PyObject*, PyObject* args) {
  long long n, groupsize, bits;
  if (!PyArg_ParseTuple(args, "LLL", &n, &groupsize, &bits)) return nullptr;
  return PyBool_FromLong(bits >= 0 && bits < 64 && spqr_hf::plane_layout_fits(n, groupsize, static_cast<int>(bits)));
}

PyObject* stat_blocks_fit(PyObject*, PyObject* args) {
  long long scale_bits, zero_bits, qq_groupsize;
  if (!PyArg_ParseTuple(args, "LLL", &scale_bits, &zero_bits, &qq_groupsize)) return nullptr;
  const bool in_range = scale_bits >= 0 && scale_bits < 64 && zero_bits >= 0 && zero_bits < 64;
  return PyBool_FromLong(in_range && spqr_hf::stat_blocks_fit(static_cast<int>(scale_bits), static_cast<int>(zero_bits),
                                                              qq_groupsize));
}

// os.environ[name] read with C getenv (CPython's os.environ writes go through putenv / unsetenv, so it
// sees them): the pure-Python mapping took ~40 us on a cold cache, and SpQRLinear reads
// SPQR_HF_BACKEND on every call. The GIL is held, so no setenv runs meanwhile.
PyObject* getenv_(PyObject*, PyObject* args) {
  const char* name;
  if (!PyArg_ParseTuple(args, "s", &name)) return nullptr;
  const char* value = std::getenv(name);
  if (value == nullptr) Py_RETURN_NONE;
  return PyUnicode_DecodeFSDefault(value);
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "Instruction set the CPU kernels use now (honours SPQR_HF_CPU_ISA)."},
    {"supported_isas", supported_isas, METH_NOARGS, "Instruction sets with kernels this CPU can run, best first."},
    {"plane_kernels", plane_kernels, METH_NOARGS,
     "Whether the CPU kernels in use have the plane-layout kernels (bfloat16 matvec, prefill)."},
    {"plane_layout_fits", plane_layout_fits, METH_VARARGS,
     "plane_layout_fits(in_features, groupsize, bits): whether a layer's codes can take the plane layout."},
    {"stat_blocks_fit", stat_blocks_fit, METH_VARARGS,
     "stat_blocks_fit(scale_bits, zero_bits, qq_groupsize): whether a plane-form layer's statistics codes take the "
     "block-major form (qq_groupsize at most out_features)."},
    {"getenv", getenv_, METH_VARARGS, "getenv(name): the environment variable's value, or None (C getenv)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "spqr_hf native kernels.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module_def); }
