using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Adapters;

/// <summary>A container module for tests: children registered by name, forward given as a delegate.</summary>
sealed class Node : nn.Module<Tensor, Tensor>
{
    public Func<Tensor, Tensor>? Body { get; set; }

    public Node(string name) : base(name) { }

    public void Add(string name, nn.Module child) => register_module(name, child);

    public nn.Module Child(string name) => named_children().First(c => c.name == name).module;

    public override Tensor forward(Tensor x) => Body is null ? throw new InvalidOperationException("No body") : Body(x);
}

static class TestTrees
{
    /// <summary>A tree holding the given leaves at their dotted paths (intermediate containers created).</summary>
    public static Node Build(IEnumerable<(string Path, nn.Module Leaf)> leaves)
    {
        var root = new Node("root");
        foreach (var (path, leaf) in leaves)
        {
            var parts = path.Split('.');
            var node = root;
            for (int i = 0; i < parts.Length - 1; i++)
            {
                var existing = node.named_children().FirstOrDefault(c => c.name == parts[i]).module;
                if (existing is Node n) { node = n; continue; }
                var created = new Node(parts[i]);
                node.Add(parts[i], created);
                node = created;
            }
            node.Add(parts[^1], leaf);
        }
        return root;
    }

    public static nn.Module<Tensor, Tensor> Leaf(nn.Module root, string path) =>
        (nn.Module<Tensor, Tensor>)root.named_modules().First(m => m.name == path).module;

    /// <summary>Bit-identical values (same shape and dtype, every element equal).</summary>
    public static bool Same(Tensor a, Tensor b)
    {
        using var scope = NewDisposeScope();
        return a.dtype == b.dtype && a.shape.SequenceEqual(b.shape) && a.eq(b).all().item<bool>();
    }

    public static double MaxAbs(Tensor a, Tensor b)
    {
        using var scope = NewDisposeScope();
        return a.to(float64).sub(b.to(float64)).abs().max().item<double>();
    }
}
