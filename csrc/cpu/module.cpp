// The Python module spqr_hf._C. Importing it runs the static registrations in ops.cpp (the CPU
// kernel of spqr_hf::spqr_linear); it also reports which instruction set the kernels use.
#include <Python.h>

#include <string>

#include "cpu_features.h"

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

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "Instruction set the CPU kernels use now (honours SPQR_HF_CPU_ISA)."},
    {"supported_isas", supported_isas, METH_NOARGS, "Instruction sets with kernels this CPU can run, best first."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "spqr_hf native kernels.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module_def); }
