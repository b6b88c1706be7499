using System.Buffers.Binary;
using System.Numerics;
using System.Text;

namespace LoraSharp.IO;

// The objects a torch.save pickle can produce in LoraSharp's restricted unpickler. Nothing else exists: every
// global outside the allow-list is refused by name when the GLOBAL opcode names it, before anything could use it.

/// <summary>A reference to an allowed global (module.name).</summary>
internal sealed record PyGlobal(string Module, string Name)
{
    public string FullName => Module + "." + Name;
}

internal sealed class PyTuple(object?[] items)
{
    public object?[] Items { get; } = items;
}

/// <summary>A dict or OrderedDict: insertion-ordered; setting an existing key replaces its value in place.</summary>
internal sealed class PyDict
{
    readonly List<KeyValuePair<object, object?>> _items = [];
    readonly Dictionary<object, int> _index = [];

    public IReadOnlyList<KeyValuePair<object, object?>> Items => _items;

    public void Set(object key, object? value)
    {
        if (_index.TryGetValue(key, out int i))
            _items[i] = new(key, value);
        else
        {
            _index[key] = _items.Count;
            _items.Add(new(key, value));
        }
    }
}

/// <summary>
/// An instance of a class that is allowed only as inert data (a PyTorch Lightning callback in an SD training checkpoint):
/// created by NEWOBJ without arguments, its BUILD state ignored, never called.
/// </summary>
internal sealed record PyOpaque(string Type);

/// <summary>A numpy dtype (<c>numpy.dtype('f8', False, True)</c> + BUILD state with the byte order), used to decode numpy scalars.</summary>
internal sealed class NumpyDType(string code)
{
    public string Code { get; } = code;
    /// <summary>'&lt;' little, '&gt;' big, '|' or '=' not applicable / native (little here).</summary>
    public char ByteOrder { get; set; } = '=';
}

/// <summary>A storage named by a persistent id: zip entry <c>data/&lt;Key&gt;</c>, <paramref name="Numel"/> elements of <paramref name="DType"/> (safetensors name).</summary>
internal sealed record StorageRef(string Key, string DType, long Numel, string Location);

/// <summary>A tensor view on a storage (what _rebuild_tensor_v2 describes).</summary>
internal sealed record TensorRef(StorageRef Storage, long Offset, long[] Size, long[] Stride);

/// <summary>
/// A restricted pickle virtual machine (protocols 2–5) for torch.save's data.pkl. It executes no code: GLOBAL and
/// STACK_GLOBAL accept only the torch tensor-rebuild functions, the torch storage types, collections.OrderedDict,
/// torch.Size, set, and what Stable Diffusion training checkpoints carry besides weights (the list A1111's restricted
/// unpickler allows): PyTorch Lightning's ModelCheckpoint class as an inert placeholder, numpy scalars and dtypes, and
/// <c>_codecs.encode</c> (how protocol 2 stores bytes). REDUCE/NEWOBJ interpret those few callables itself. Any other
/// global is refused with an error naming it.
/// </summary>
internal sealed class PickleMachine
{
    static readonly Dictionary<string, string> StorageTypes = new(StringComparer.Ordinal)
    {
        ["torch.FloatStorage"] = "F32",
        ["torch.HalfStorage"] = "F16",
        ["torch.BFloat16Storage"] = "BF16",
        ["torch.DoubleStorage"] = "F64",
        ["torch.LongStorage"] = "I64",
        ["torch.IntStorage"] = "I32",
        ["torch.ShortStorage"] = "I16",
        ["torch.CharStorage"] = "I8",
        ["torch.ByteStorage"] = "U8",
        ["torch.BoolStorage"] = "BOOL",
        ["torch.UntypedStorage"] = "U8",
        ["torch.storage.UntypedStorage"] = "U8",
    };

    static readonly HashSet<string> Callables = new(StringComparer.Ordinal)
    {
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch._tensor._rebuild_from_type_v2",
        "collections.OrderedDict",
        "torch.Size",
        // Only as the type argument of _rebuild_from_type_v2 (never called):
        "torch.Tensor",
        "torch.nn.parameter.Parameter",
        // Non-weight data of SD training checkpoints, interpreted here (A1111's allow-list):
        "_codecs.encode",
        "numpy.dtype",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "__builtin__.set",
        "builtins.set",
    };

    /// <summary>Classes (and the module reference A1111 allows) kept as inert placeholders: dict keys, or instances made by NEWOBJ whose state is ignored.</summary>
    static readonly HashSet<string> InertTypes = new(StringComparer.Ordinal)
    {
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
        "pytorch_lightning.callbacks.model_checkpoint",
    };

    /// <summary>The globals the reader accepts, for documentation and error messages.</summary>
    public static IEnumerable<string> AllowedGlobals => Callables.Concat(StorageTypes.Keys).Concat(InertTypes).Order(StringComparer.Ordinal);

    sealed class Mark
    {
        public static readonly Mark Instance = new();
    }

    readonly byte[] _data;
    readonly string _file;
    readonly string _entry;
    readonly Dictionary<string, StorageRef> _storages = new(StringComparer.Ordinal);
    int _pos;

    PickleMachine(byte[] data, string file, string entry)
    {
        _data = data;
        _file = file;
        _entry = entry;
    }

    /// <summary>Runs a pickle to its STOP opcode and returns the top object.</summary>
    public static object? Load(byte[] data, string file, string entry = "data.pkl") => new PickleMachine(data, file, entry).Run();

    LoraSharpException Error(string problem) => new($"{_entry}: {problem} (at byte {_pos})", _file);

    ReadOnlySpan<byte> Take(long n)
    {
        if (n < 0 || n > _data.Length - _pos)
            throw Error($"pickle ends early (needs {n} more bytes, {_data.Length - _pos} left)");
        var s = _data.AsSpan(_pos, (int)n);
        _pos += (int)n;
        return s;
    }

    byte U8() => Take(1)[0];

    string Line()
    {
        int end = Array.IndexOf(_data, (byte)'\n', _pos);
        if (end < 0) throw Error("pickle ends inside a GLOBAL name");
        var s = Encoding.UTF8.GetString(_data, _pos, end - _pos);
        _pos = end + 1;
        return s;
    }

    object? Run()
    {
        var stack = new List<object?>();
        var marks = new Stack<int>();
        var memo = new Dictionary<long, object?>();

        object? Pop()
        {
            if (stack.Count == 0) throw Error("stack underflow");
            var v = stack[^1];
            stack.RemoveAt(stack.Count - 1);
            if (v is Mark) throw Error("unexpected MARK on the stack");
            return v;
        }
        object? Peek()
        {
            if (stack.Count == 0) throw Error("stack underflow");
            return stack[^1];
        }
        List<object?> PopToMark()
        {
            if (marks.Count == 0) throw Error("no MARK to pop to");
            int m = marks.Pop();
            var items = stack.GetRange(m + 1, stack.Count - m - 1);
            stack.RemoveRange(m, stack.Count - m);
            if (items.Any(i => i is Mark)) throw Error("nested MARK");
            return items;
        }
        void Push(object? v) => stack.Add(v);

        while (true)
        {
            if (_pos >= _data.Length)
                throw Error("pickle ends without a STOP opcode");
            int opAt = _pos;
            byte op = U8();
            switch (op)
            {
                case 0x80: // PROTO
                    int proto = U8();
                    if (proto > 5) throw Error($"unsupported pickle protocol {proto}");
                    break;
                case 0x95: // FRAME
                    Take(8);
                    break;
                case (byte)'}': Push(new PyDict()); break;
                case (byte)']': Push(new List<object?>()); break;
                case (byte)')': Push(new PyTuple([])); break;
                case (byte)'(':
                    marks.Push(stack.Count);
                    Push(Mark.Instance);
                    break;
                case (byte)'X': Push(Utf8(BinaryPrimitives.ReadUInt32LittleEndian(Take(4)))); break;
                case 0x8c: Push(Utf8(U8())); break;
                case 0x8d: Push(Utf8((long)Math.Min(BinaryPrimitives.ReadUInt64LittleEndian(Take(8)), long.MaxValue))); break;
                case (byte)'T': Push(Encoding.Latin1.GetString(Take(BinaryPrimitives.ReadInt32LittleEndian(Take(4))))); break;
                case (byte)'U': Push(Encoding.Latin1.GetString(Take(U8()))); break;
                case (byte)'C': Push(Take(U8()).ToArray()); break;
                case (byte)'B': Push(Take(BinaryPrimitives.ReadUInt32LittleEndian(Take(4))).ToArray()); break;
                case 0x8e: Push(Take((long)Math.Min(BinaryPrimitives.ReadUInt64LittleEndian(Take(8)), long.MaxValue)).ToArray()); break;
                case (byte)'J': Push((long)BinaryPrimitives.ReadInt32LittleEndian(Take(4))); break;
                case (byte)'K': Push((long)U8()); break;
                case (byte)'M': Push((long)BinaryPrimitives.ReadUInt16LittleEndian(Take(2))); break;
                case 0x8a: Push(Long(U8())); break;
                case 0x8b:
                {
                    int n = BinaryPrimitives.ReadInt32LittleEndian(Take(4));
                    if (n < 0) throw Error("negative LONG4 length");
                    Push(Long(n));
                    break;
                }
                case (byte)'G': Push(BinaryPrimitives.ReadDoubleBigEndian(Take(8))); break;
                case 0x88: Push(true); break;
                case 0x89: Push(false); break;
                case (byte)'N': Push(null); break;
                case 0x85: Push(new PyTuple([Pop()])); break;
                case 0x86: { var b = Pop(); var a = Pop(); Push(new PyTuple([a, b])); break; }
                case 0x87: { var c = Pop(); var b = Pop(); var a = Pop(); Push(new PyTuple([a, b, c])); break; }
                case (byte)'t': Push(new PyTuple(PopToMark().ToArray())); break;
                case (byte)'l': Push(PopToMark()); break; // LIST
                case (byte)'d': // DICT
                {
                    var items = PopToMark();
                    Push(FillDict(new PyDict(), items));
                    break;
                }
                case (byte)'s':
                {
                    var v = Pop();
                    var k = Pop();
                    AsDict(Peek(), "SETITEM").Set(Key(k), v);
                    break;
                }
                case (byte)'u':
                {
                    var items = PopToMark();
                    FillDict(AsDict(Peek(), "SETITEMS"), items);
                    break;
                }
                case (byte)'a':
                {
                    var v = Pop();
                    AsList(Peek(), "APPEND").Add(v);
                    break;
                }
                case (byte)'e':
                {
                    var items = PopToMark();
                    AsList(Peek(), "APPENDS").AddRange(items);
                    break;
                }
                case 0x8f: Push(new List<object?>()); break; // EMPTY_SET (kept as a list; only its members matter)
                case 0x90: { var items = PopToMark(); AsList(Peek(), "ADDITEMS").AddRange(items); break; }
                case 0x91: Push(PopToMark()); break; // FROZENSET
                case (byte)'0': Pop(); break; // POP
                case (byte)'1': PopToMark(); break; // POP_MARK
                case (byte)'2': Push(Peek()); break; // DUP
                case (byte)'q': memo[U8()] = Peek(); break;
                case (byte)'r': memo[BinaryPrimitives.ReadUInt32LittleEndian(Take(4))] = Peek(); break;
                case 0x94: memo[memo.Count] = Peek(); break;
                case (byte)'h': Push(Memo(memo, U8())); break;
                case (byte)'j': Push(Memo(memo, BinaryPrimitives.ReadUInt32LittleEndian(Take(4)))); break;
                case (byte)'c':
                {
                    var module = Line();
                    var name = Line();
                    Push(Global(module, name));
                    break;
                }
                case 0x93:
                {
                    var name = Pop();
                    var module = Pop();
                    if (module is not string m || name is not string n) throw Error("STACK_GLOBAL needs two strings");
                    Push(Global(m, n));
                    break;
                }
                case (byte)'R':
                {
                    var args = Pop();
                    var fn = Pop();
                    if (args is not PyTuple t) throw Error("REDUCE arguments are not a tuple");
                    Push(Call(fn, t.Items));
                    break;
                }
                case 0x81: // NEWOBJ
                {
                    var args = Pop();
                    var cls = Pop();
                    if (args is not PyTuple t) throw Error("NEWOBJ arguments are not a tuple");
                    if (cls is PyGlobal { FullName: "collections.OrderedDict" } && t.Items.Length == 0)
                        Push(new PyDict());
                    else if (cls is PyGlobal g && InertTypes.Contains(g.FullName) && t.Items.Length == 0)
                        Push(new PyOpaque(g.FullName));
                    else
                        throw Error($"cannot construct {Describe(cls)} (only collections.OrderedDict and inert placeholders can be created with NEWOBJ)");
                    break;
                }
                case (byte)'b': // BUILD: state of an OrderedDict (its _metadata), a tensor or a placeholder (ignored), or a numpy dtype (its byte order)
                {
                    var state = Pop();
                    var target = Peek();
                    if (target is NumpyDType dt)
                    {
                        if (state is PyTuple { Items: [_, string order, ..] } && order.Length == 1) dt.ByteOrder = order[0];
                        else throw Error($"numpy dtype state is {Describe(state)}, expected (version, byte order, ...)");
                    }
                    else if (target is not (PyDict or TensorRef or PyOpaque))
                        throw Error($"BUILD on {Describe(target)} is not supported");
                    break;
                }
                case (byte)'Q': // BINPERSID
                    Push(Persistent(Pop()));
                    break;
                case (byte)'.':
                    if (stack.Count != 1 || marks.Count != 0)
                        throw Error($"STOP with {stack.Count} objects on the stack (expected 1)");
                    return stack[0];
                default:
                    _pos = opAt;
                    throw Error($"unsupported pickle opcode 0x{op:x2} ('{(char)op}')");
            }
        }
    }

    string Utf8(long n)
    {
        try
        {
            return new UTF8Encoding(false, true).GetString(Take(n));
        }
        catch (DecoderFallbackException)
        {
            throw Error("string is not valid UTF-8");
        }
    }

    object Long(int n)
    {
        var bytes = Take(n);
        if (n == 0) return 0L;
        var big = new BigInteger(bytes, isUnsigned: false, isBigEndian: false);
        return big >= long.MinValue && big <= long.MaxValue ? (long)big : big;
    }

    object? Memo(Dictionary<long, object?> memo, long index) =>
        memo.TryGetValue(index, out var v) ? v : throw Error($"memo slot {index} read before it was written");

    object Key(object? k) => k switch
    {
        null => throw Error("None as a dict key is not supported"),
        _ => k,
    };

    PyDict FillDict(PyDict d, List<object?> items)
    {
        if (items.Count % 2 != 0) throw Error("odd number of items for a dict");
        for (int i = 0; i < items.Count; i += 2)
            d.Set(Key(items[i]), items[i + 1]);
        return d;
    }

    PyDict AsDict(object? o, string op) => o as PyDict ?? throw Error($"{op} on {Describe(o)}, expected a dict");

    List<object?> AsList(object? o, string op) => o as List<object?> ?? throw Error($"{op} on {Describe(o)}, expected a list");

    PyGlobal Global(string module, string name)
    {
        var full = module + "." + name;
        if (!Callables.Contains(full) && !StorageTypes.ContainsKey(full) && !InertTypes.Contains(full))
            throw new LoraSharpException(
                $"{_entry}: refused global '{full}': the pickle reader only accepts tensors, storages, dicts, lists and plain values "
                + "and never runs code from a file (re-save the weights as safetensors if the file is trusted)", _file, full);
        return new PyGlobal(module, name);
    }

    static string Describe(object? o) => o switch
    {
        null => "None",
        PyGlobal g => g.FullName,
        PyTuple => "a tuple",
        PyDict => "a dict",
        List<object?> => "a list",
        string => "a string",
        long or BigInteger => "an int",
        double => "a float",
        bool => "a bool",
        TensorRef => "a tensor",
        StorageRef => "a storage",
        byte[] => "bytes",
        PyOpaque p => $"a {p.Type} placeholder",
        NumpyDType d => $"numpy dtype '{d.Code}'",
        _ => o.GetType().Name,
    };

    object Persistent(object? pid)
    {
        if (pid is not PyTuple { Items: [string tag, PyGlobal type, string key, string location, long numel] } || tag != "storage")
            throw Error($"persistent id {Describe(pid)} is not ('storage', type, key, location, numel)");
        if (!StorageTypes.TryGetValue(type.FullName, out var dtype))
            throw Error($"'{type.FullName}' is not a storage type");
        if (numel < 0) throw Error($"storage '{key}' has negative size {numel}");
        if (_storages.TryGetValue(key, out var existing))
        {
            if (existing.DType != dtype)
                throw Error($"storage '{key}' is used as both {existing.DType} and {dtype}");
            return existing;
        }
        var s = new StorageRef(key, dtype, numel, location);
        _storages[key] = s;
        return s;
    }

    /// <summary>A numpy scalar's value: float → double, (unsigned) int → long, bool → bool.</summary>
    object NumpyScalar(NumpyDType dtype, byte[] raw)
    {
        var code = dtype.Code.TrimStart('<', '>', '=', '|');
        if (code.Length < 2 || !int.TryParse(code.AsSpan(1), out int size) || size != raw.Length)
            throw Error($"numpy scalar of dtype '{dtype.Code}' with {raw.Length} bytes is not supported");
        bool big = dtype.ByteOrder == '>' || dtype.Code.StartsWith('>');
        var b = (byte[])raw.Clone();
        if (big != !BitConverter.IsLittleEndian) Array.Reverse(b);
        return (code[0], size) switch
        {
            ('f', 8) => BitConverter.ToDouble(b),
            ('f', 4) => (double)BitConverter.ToSingle(b),
            ('f', 2) => (double)BitConverter.ToHalf(b),
            ('i', 8) => BitConverter.ToInt64(b),
            ('i', 4) => (long)BitConverter.ToInt32(b),
            ('i', 2) => (long)BitConverter.ToInt16(b),
            ('i', 1) => (long)(sbyte)b[0],
            ('u', 8) => BitConverter.ToUInt64(b) <= long.MaxValue ? (long)BitConverter.ToUInt64(b) : (object)new BigInteger(BitConverter.ToUInt64(b)),
            ('u', 4) => (long)BitConverter.ToUInt32(b),
            ('u', 2) => (long)BitConverter.ToUInt16(b),
            ('u', 1) => (long)b[0],
            ('b', 1) => b[0] != 0,
            _ => throw Error($"numpy scalar of dtype '{dtype.Code}' is not supported"),
        };
    }

    long[] Ints(object? o, string what)
    {
        var items = o as PyTuple is { } t ? t.Items : o as List<object?> is { } l ? l.ToArray() : throw Error($"{what} is {Describe(o)}, expected a tuple of ints");
        var r = new long[items.Length];
        for (int i = 0; i < items.Length; i++)
            r[i] = items[i] is long v ? v : throw Error($"{what} holds {Describe(items[i])}, expected ints");
        return r;
    }

    object? Call(object? fn, object?[] args)
    {
        if (fn is not PyGlobal g)
            throw Error($"REDUCE on {Describe(fn)}, which is not callable");
        switch (g.FullName)
        {
            case "collections.OrderedDict":
                if (args.Length == 0) return new PyDict();
                if (args is [List<object?> pairs])
                {
                    var d = new PyDict();
                    foreach (var p in pairs)
                        if (p is PyTuple { Items: [var k, var v] }) d.Set(Key(k), v);
                        else throw Error("OrderedDict argument is not a list of pairs");
                    return d;
                }
                throw Error("unsupported OrderedDict arguments");
            case "__builtin__.set" or "builtins.set":
                return args switch
                {
                    [] => new List<object?>(),
                    [List<object?> items] => new List<object?>(items),
                    _ => throw Error("set takes one list"),
                };
            case "_codecs.encode":
                // protocol 2 pickles bytes as _codecs.encode(text, 'latin1'): each character is one byte
                if (args is [string text, string encoding] && encoding.Replace("-", "").Replace("_", "").ToLowerInvariant() is "latin1" or "iso88591")
                    return Encoding.Latin1.GetBytes(text);
                throw Error("_codecs.encode is only read as (text, 'latin1')");
            case "numpy.dtype":
                return args is [string code, ..] ? new NumpyDType(code) : throw Error("numpy.dtype takes a type code string");
            case "numpy.core.multiarray.scalar" or "numpy._core.multiarray.scalar":
                return args is [NumpyDType dtype, byte[] raw] ? NumpyScalar(dtype, raw) : throw Error("numpy scalar takes (dtype, bytes)");
            case "torch.Size":
                return args is [var sizes] ? new PyTuple(Ints(sizes, "torch.Size").Cast<object?>().ToArray()) : throw Error("torch.Size takes one tuple");
            case "torch._utils._rebuild_tensor_v2" when args.Length is 6 or 7:
            case "torch._utils._rebuild_tensor" when args.Length == 4:
            {
                if (args[0] is not StorageRef storage) throw Error($"{g.FullName}: first argument is {Describe(args[0])}, expected a storage");
                if (args[1] is not long offset) throw Error($"{g.FullName}: storage offset is {Describe(args[1])}, expected an int");
                return new TensorRef(storage, offset, Ints(args[2], "tensor size"), Ints(args[3], "tensor stride"));
            }
            case "torch._utils._rebuild_parameter" when args.Length == 3:
            case "torch._utils._rebuild_parameter_with_state" when args.Length == 4:
                return args[0] is TensorRef tr ? tr : throw Error($"{g.FullName}: data is {Describe(args[0])}, expected a tensor");
            case "torch._tensor._rebuild_from_type_v2" when args.Length == 4:
                if (args[1] is not PyGlobal { FullName: "torch.Tensor" or "torch.nn.parameter.Parameter" })
                    throw Error($"_rebuild_from_type_v2 with type {Describe(args[1])} is not supported");
                if (args[2] is not PyTuple inner) throw Error("_rebuild_from_type_v2 arguments are not a tuple");
                if (args[0] is not PyGlobal { FullName: "torch._utils._rebuild_tensor_v2" or "torch._utils._rebuild_tensor" or "torch._utils._rebuild_parameter" })
                    throw Error($"_rebuild_from_type_v2 of {Describe(args[0])} is not supported");
                return Call(args[0], inner.Items);
            default:
                throw Error($"{g.FullName} cannot be called with {args.Length} arguments here");
        }
    }
}
