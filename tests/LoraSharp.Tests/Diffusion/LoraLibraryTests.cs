using LoraSharp.Diffusion;
using LoraSharp.IO;
using LoraSharp.Tests.Infrastructure;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Diffusion;

public class LoraLibraryTests
{
    static string Touch(string path)
    {
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        File.WriteAllBytes(path, [1, 2, 3]);
        return path;
    }

    [Fact]
    public void Scans_recursively_for_lora_extensions_and_resolves_by_stem()
    {
        using var tmp = new TempDir();
        Touch(tmp.File("style.safetensors"));
        Touch(Path.Combine(tmp.Path, "chars", "anna.pt"));
        Touch(Path.Combine(tmp.Path, "chars", "deep", "bob.CKPT"));
        Touch(tmp.File("notes.txt"));
        var lib = LoraLibrary.Open(tmp.Path);
        Assert.Equal(3, lib.Entries.Count);
        Assert.Equal(Path.Combine("chars", "anna.pt"), lib.Resolve("anna").RelativePath);
        Assert.Equal("bob", lib.Resolve("bob").Name);
        Assert.EndsWith("style.safetensors", lib.Resolve("style").FullPath);
    }

    [Fact]
    public void Case_insensitive_match_when_unique()
    {
        using var tmp = new TempDir();
        Touch(tmp.File("MyStyle.safetensors"));
        Assert.Equal("MyStyle", LoraLibrary.Open(tmp.Path).Resolve("mystyle").Name);
    }

    [Fact]
    public void Missing_name_lists_close_matches()
    {
        using var tmp = new TempDir();
        Touch(tmp.File("watercolor_v2.safetensors"));
        Touch(tmp.File("pixel_art.safetensors"));
        var e = Assert.Throws<LoraSharpException>(() => LoraLibrary.Open(tmp.Path).Resolve("watercolour_v2"));
        Assert.Contains("not found", e.Message);
        Assert.Contains("did you mean: watercolor_v2", e.Message);
        Assert.DoesNotContain("pixel_art", e.Message);
    }

    [Fact]
    public void Ambiguous_name_lists_the_candidates()
    {
        using var tmp = new TempDir();
        Touch(Path.Combine(tmp.Path, "a", "dup.safetensors"));
        Touch(Path.Combine(tmp.Path, "b", "dup.pt"));
        var e = Assert.Throws<LoraSharpException>(() => LoraLibrary.Open(tmp.Path).Resolve("dup"));
        Assert.Contains("ambiguous", e.Message);
        Assert.Contains(Path.Combine("a", "dup.safetensors"), e.Message);
        Assert.Contains(Path.Combine("b", "dup.pt"), e.Message);
    }

    [Theory]
    [InlineData("../secret")]
    [InlineData("..")]
    [InlineData("sub/style")]
    [InlineData("sub\\style")]
    [InlineData("/etc/passwd")]
    [InlineData("C:style")]
    [InlineData("")]
    public void Path_like_names_are_refused(string name)
    {
        using var tmp = new TempDir();
        Touch(Path.Combine(tmp.Path, "sub", "style.safetensors"));
        var e = Assert.Throws<LoraSharpException>(() => LoraLibrary.Open(tmp.Path).Resolve(name));
        Assert.Contains("refused", e.Message);
    }

    [Fact]
    public void Symlinks_leaving_the_folder_are_not_listed()
    {
        if (OperatingSystem.IsWindows()) return; // creating symlinks needs privileges there
        using var tmp = new TempDir();
        var root = Directory.CreateDirectory(tmp.File("Lora")).FullName;
        var outside = Touch(Path.Combine(tmp.Path, "outside", "secret.safetensors"));
        File.CreateSymbolicLink(Path.Combine(root, "leak.safetensors"), outside);
        Directory.CreateSymbolicLink(Path.Combine(root, "linkdir"), Path.GetDirectoryName(outside)!);
        var inside = Touch(Path.Combine(root, "real", "ok.safetensors"));
        File.CreateSymbolicLink(Path.Combine(root, "alias_ok.safetensors"), inside);

        var lib = LoraLibrary.Open(root);
        Assert.Equal(["alias_ok", "ok"], lib.Entries.Select(e => e.Name).Order());
        Assert.Throws<LoraSharpException>(() => lib.Resolve("leak"));
        Assert.Throws<LoraSharpException>(() => lib.Resolve("secret"));
        Assert.Contains(lib.Skipped, s => s.Path.EndsWith("leak.safetensors"));
    }

    [Fact]
    public void Root_that_is_itself_a_symlink_works()
    {
        if (OperatingSystem.IsWindows()) return;
        using var tmp = new TempDir();
        var real = Directory.CreateDirectory(tmp.File("store")).FullName;
        Touch(Path.Combine(real, "x.safetensors"));
        var link = tmp.File("Lora");
        Directory.CreateSymbolicLink(link, real);
        Assert.Equal("x", LoraLibrary.Open(link).Resolve("x").Name);
    }

    [Fact]
    public void Alias_from_ss_output_name_resolves_when_enabled()
    {
        using var tmp = new TempDir();
        using (var scope = NewDisposeScope())
            SafetensorsWriter.Write(tmp.File("file_stem.safetensors"), [new KeyValuePair<string, Tensor>("w", zeros(2))], new Dictionary<string, string> { ["ss_output_name"] = "nice_alias" });
        Assert.Equal("file_stem", LoraLibrary.Open(tmp.Path, readAliases: true).Resolve("nice_alias").Name);
        Assert.Throws<LoraSharpException>(() => LoraLibrary.Open(tmp.Path).Resolve("nice_alias"));
    }

    [Fact]
    public void Missing_folder_is_a_clear_error()
    {
        using var tmp = new TempDir();
        var e = Assert.Throws<LoraSharpException>(() => LoraLibrary.Open(tmp.File("nope")));
        Assert.Contains("LoRA folder not found", e.Message);
    }

    [Theory]
    [InlineData("kitten", "sitting", 3)]
    [InlineData("", "abc", 3)]
    [InlineData("same", "same", 0)]
    public void Edit_distance_is_levenshtein(string a, string b, int d) => Assert.Equal(d, EditDistance.Levenshtein(a, b));
}
